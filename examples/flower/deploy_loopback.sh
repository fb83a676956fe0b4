#!/usr/bin/env bash
# The example on Flower's deployment engine, all on loopback: one SuperLink, one SuperNode per
# institution (each with its own fedsec identity in --node-config), then `flwr run`.
#
#   examples/flower/deploy_loopback.sh            # 4 institutions, 3 rounds
#   INSTITUTIONS=3 ROUNDS=2 RECORDS=40 EVAL_RECORDS=16 LOCAL_STEPS=3 examples/flower/deploy_loopback.sh
#   COMPARE=1 ...                                 # then also run `fedsec simulate` and compare
#
# Insecure (no TLS) because everything is on 127.0.0.1; a real deployment gives the SuperLink a
# certificate and turns on SuperNode authentication (see docs/flower.md). Prints the ServerApp's
# JSON summary; logs and keys stay in $WORK (printed at the end).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
BIN="${VENV:-$REPO/.venv}/bin"
N="${INSTITUTIONS:-4}"
ROUNDS="${ROUNDS:-3}"
RECORDS="${RECORDS:-160}"
EVAL_RECORDS="${EVAL_RECORDS:-48}"
LOCAL_STEPS="${LOCAL_STEPS:-10}"
WORK="${WORK:-$(mktemp -d -t fedsec-flower-deploy-XXXX)}"
export PATH="$BIN:$PATH"         # the SuperLink and SuperNodes start flower-superexec from PATH
export FLWR_HOME="$WORK/flwr-home"   # the flwr CLI's connection config, kept out of ~/.flwr
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$WORK/logs" "$FLWR_HOME"
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

"$BIN/python" -m fedsec_flower_example.keys --institutions "$N" --out "$WORK/keys"

"$BIN/flower-superlink" --insecure --database "$WORK/state.db" \
    >"$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
for i in $(seq 1 "$N"); do
    "$BIN/flower-supernode" --insecure --superlink 127.0.0.1:8000 --port $((9100 + i)) \
        --node-config "fedsec-client-id=$i fedsec-identity=\"$WORK/keys/institution-$i.key\" fedsec-roster=\"$WORK/keys/roster.toml\"" \
        >"$WORK/logs/supernode-$i.log" 2>&1 &
    PIDS+=($!)
done

cat >"$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "loopback"

[superlink.loopback]
address = "127.0.0.1:8000"
insecure = true
TOML

# Wait for the SuperLink (Flower 1.42 serves its Control, Fleet and Runtime APIs over HTTP on :8000) (it can take a while on a busy machine).
for _ in $(seq 1 120); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && break; sleep 1; done
"$BIN/flwr" run "$HERE" loopback --stream --run-config \
    "institutions=$N rounds=$ROUNDS records=$RECORDS eval-records=$EVAL_RECORDS local-steps=$LOCAL_STEPS keys-dir=\"$WORK/keys\" out-dir=\"$WORK/out\"" \
    >"$WORK/logs/flwr-run.log" 2>&1 || { tail -40 "$WORK/logs/flwr-run.log"; exit 1; }

for _ in $(seq 1 120); do [ -f "$WORK/out/flower_result.json" ] && break; sleep 2; done
if [ ! -f "$WORK/out/flower_result.json" ]; then
    echo "error: no result; see $WORK/logs" >&2
    exit 1
fi
cat "$WORK/out/flower_result.json"; echo
if [ -n "${COMPARE:-}" ]; then
    cleanup
    "$BIN/python" "$HERE/run_simulation.py" --institutions "$N" --rounds "$ROUNDS" \
        --records "$RECORDS" --eval-records "$EVAL_RECORDS" --local-steps "$LOCAL_STEPS" \
        --compare-with "$WORK/out"
fi
echo "logs and keys: $WORK" >&2
