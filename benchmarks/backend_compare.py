"""Pairwise masking versus CKKS: client time, server time, upload size and precision.

For each dimension d, n clients hold float32 updates (normal, sigma 0.01, clipped to ±0.1, the
scale of LoRA updates). Both backends use their real code paths:

- masking: :func:`secagg.encoding.encode` then a full protocol session through
  :class:`secagg.simulate.Simulation` (every message through its byte encoding), then
  :func:`secagg.encoding.decode_sum`. ``client_s`` is encoding plus every ``ClientSession`` call
  of one client (mean over clients); ``server_s`` is every ``ServerSession`` call.
- CKKS: the sessions of :mod:`secagg.he.session`: :meth:`HeClientSession.encrypt` (``client_s``,
  mean; includes the integrity pads), :meth:`HeServerSession.receive_update` and
  ``close_uploads`` (``server_s``); ``decrypt_s`` is the decryptor opening the sum (pads of every
  contributor recomputed and checked, then the release).

``max_abs_error`` is max |decoded sum - exact float64 sum of the clipped updates|.

Usage: ``python benchmarks/backend_compare.py --clients 10 --dims 100000,1000000``; prints one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from secagg.encoding import QuantizationParams, decode_sum, encode
from secagg.he import (
    CKKSParams,
    HeClientSession,
    HeRoundSpec,
    HeServerSession,
    PublicContext,
    generate_federation_keys,
)
from secagg.params import session_shape
from secagg.protocol import RoundParams, ServerSession
from secagg.simulate import Simulation

CLIP = 0.1
RING_BITS = 32


class _Timed:
    """Passes every attribute through; accumulates the seconds spent in the named methods."""

    def __init__(self, inner: object, methods: tuple[str, ...]) -> None:
        self._inner = inner
        self._methods = methods
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in self._methods:
            return attribute

        def timed(*args: Any, **kwargs: Any) -> Any:
            begin = time.perf_counter()
            try:
                return attribute(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - begin

        return timed


def _updates(n: int, dim: int) -> list[npt.NDArray[np.float32]]:
    rng = np.random.default_rng(dim + n)
    return [rng.normal(0.0, 0.01, dim).astype(np.float32) for _ in range(n)]


def _exact(updates: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
    return np.asarray(np.sum([np.clip(u.astype(np.float64), -CLIP, CLIP) for u in updates], axis=0))


def bench_masking(n: int, dim: int) -> dict[str, object]:
    updates = _updates(n, dim)
    quant = QuantizationParams.fit(RING_BITS, CLIP, max_clients=n)
    cohort = tuple(range(1, n + 1))
    encode_seconds = 0.0
    inputs = {}
    for u, update in zip(cohort, updates, strict=True):
        begin = time.perf_counter()
        inputs[u] = encode(update, quant).vector
        encode_seconds += time.perf_counter() - begin
    shape = session_shape(n)
    params = RoundParams(
        os.urandom(32), RING_BITS, dim, shape.threshold, cohort, quorum=shape.quorum
    )
    sim = Simulation(params, inputs, record_masked_inputs=False)
    clients = {u: _Timed(c, ("start", "handle")) for u, c in sim.clients.items()}
    server = _Timed(sim.server, ("receive", "close_stage"))
    sim.clients = cast(Any, clients)
    sim.server = cast(ServerSession, server)
    outcome = sim.run()
    begin = time.perf_counter()
    decoded = decode_sum(outcome.result.sum, quant, len(outcome.result.contributors))
    server_seconds = server.seconds + time.perf_counter() - begin
    client_seconds = (encode_seconds + sum(c.seconds for c in clients.values())) / n
    error = np.abs(decoded.total.astype(np.float64) - _exact(updates)).max()
    return {
        "backend": "masking",
        "dim": dim,
        "client_s": round(client_seconds, 4),
        "server_s": round(server_seconds, 4),
        "upload_bytes": int(np.mean(list(outcome.upload_bytes.values()))),
        "max_abs_error": float(error),
    }


def bench_ckks(n: int, dim: int, params: CKKSParams) -> dict[str, object]:
    updates = _updates(n, dim)
    keys = generate_federation_keys(params)
    spec = HeRoundSpec(params, os.urandom(32), tuple(range(1, n + 1)), dim, keys.fingerprint)
    clients = {u: HeClientSession(u, keys.secret, spec) for u in spec.cohort}
    begin = time.perf_counter()
    uploads = [clients[u].encrypt(x) for u, x in zip(spec.cohort, updates, strict=True)]
    client_seconds = (time.perf_counter() - begin) / n
    begin = time.perf_counter()
    public = PublicContext.from_bytes(keys.public.to_bytes(), params, keys.fingerprint)
    server = HeServerSession(public, spec)
    for sender, upload in zip(spec.cohort, uploads, strict=True):
        server.receive_update(sender, upload)
    aggregate = server.close_uploads()
    server_seconds = time.perf_counter() - begin
    begin = time.perf_counter()
    result = clients[spec.decryptor].decrypt(aggregate)
    decrypt_seconds = time.perf_counter() - begin
    error = np.abs(result.total.astype(np.float64) - _exact(updates)).max()
    return {
        "backend": "ckks",
        "dim": dim,
        "client_s": round(client_seconds, 4),
        "server_s": round(server_seconds, 4),
        "decrypt_s": round(decrypt_seconds, 4),
        "upload_bytes": int(np.mean([len(u) for u in uploads])),
        "aggregate_bytes": len(aggregate),
        "public_context_bytes": len(keys.public.to_bytes()),
        "max_abs_error": float(error),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--dims", default="100000,1000000")
    args = parser.parse_args()
    dims = [int(d) for d in args.dims.split(",")]
    n = args.clients
    ckks = CKKSParams(clip=CLIP, max_clients=n)
    results = []
    for dim in dims:
        results.append(bench_masking(n, dim))
        results.append(bench_ckks(n, dim, ckks))
    print(
        json.dumps(
            {
                "benchmark": "backend_compare",
                "clients": n,
                "clip": CLIP,
                "masking": {"ring_bits": RING_BITS, "graph": "complete", "threshold": n // 2 + 1},
                "ckks_params": ckks.describe(),
                "security_bits": ckks.security_bits,
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
