"""``fedsec he-keys``: an institution's part in making the federation's CKKS keys.

The coordinator never holds the secret key; the institutions make and share it themselves.
Files move between institutions by any channel (the coordinator may relay them: every one is
signed or sealed end to end). In production the *dealer* is one of the institutions, chosen by
the federation, never the coordinator nor the CA that issued TLS certificates.

1. ``fedsec he-keys session`` (the dealer): print a fresh key-distribution session id.
2. ``fedsec he-keys announce --config client.toml --session HEX --out FILE`` (every other
   institution): a fresh X25519 key signed with the institution's identity; the private half is
   kept beside the secret-context path of ``client.toml`` (mode 0600), ``FILE`` goes to the dealer.
3. ``fedsec he-keys deal --config client.toml --session HEX --public-out FILE --sealed-dir DIR
   ANNOUNCEMENT...`` (the dealer): generate the keys (the CKKS secret key and the federation's
   tag key, from which every upload's integrity pads derive), store its own secret context,
   write the public context for the coordinator (``[ckks] public_context`` of its server.toml)
   and one ``sealed-<id>.bin`` per announcing institution.
4. ``fedsec he-keys open --config client.toml --sealed FILE`` (each institution): check the
   dealer's signature against the roster, open the sealed context (secret key and tag key),
   store it at the
   ``[ckks] secret_context`` path (mode 0600) and delete the one-time agreement key.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clients.client_config import ClientConfig, load_client_config
from fl_core.cli import UsageError
from secagg.errors import SecAggError
from wire.he_files import (
    CkksShape,
    announce,
    deal,
    load_agreement_key,
    new_session_id,
    open_sealed,
    read_announcement,
    save_agreement_key,
    save_secret_context,
    write_announcement,
    write_public_context,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("session", help="print a fresh key-distribution session id (the dealer)")
    ann = sub.add_parser("announce", help="announce this institution's signed X25519 key")
    ann.add_argument("--config", type=Path, required=True, help="this institution's client.toml")
    ann.add_argument("--session", required=True, help="the dealer's session id (64 hex digits)")
    ann.add_argument("--out", type=Path, required=True, help="announcement file for the dealer")
    dealer = sub.add_parser("deal", help="generate the keys and seal them (the dealer)")
    dealer.add_argument("--config", type=Path, required=True, help="the dealer's client.toml")
    dealer.add_argument("--session", required=True, help="session id (64 hex digits)")
    dealer.add_argument("--public-out", type=Path, required=True, help="public context file")
    dealer.add_argument("--sealed-dir", type=Path, required=True, help="where sealed files go")
    dealer.add_argument("announcements", type=Path, nargs="+", help="institutions' announcements")
    dealer.add_argument("--poly-modulus-degree", type=int, default=8192)
    dealer.add_argument("--coeff-mod-bit-sizes", default="60,60", help="comma-separated")
    dealer.add_argument("--scale-bits", type=int, default=40)
    opener = sub.add_parser("open", help="open the sealed secret context addressed to us")
    opener.add_argument("--config", type=Path, required=True, help="this institution's client.toml")
    opener.add_argument(
        "--sealed", type=Path, required=True, help="sealed-<id>.bin from the dealer"
    )


def _session(text: str) -> bytes:
    try:
        session = bytes.fromhex(text)
    except ValueError:
        raise UsageError("--session must be hexadecimal") from None
    if len(session) != 32:
        raise UsageError(f"--session must be 32 bytes (64 hex digits), got {len(session)}")
    return session


def _ckks_config(path: Path) -> tuple[ClientConfig, Path]:
    config = load_client_config(path, load_secret=False)
    if config.backend != "ckks" or config.ckks_secret_path is None:
        raise UsageError(f'{path}: set [client] backend = "ckks" and [ckks] secret_context')
    return config, config.ckks_secret_path


def _agreement_path(secret_path: Path) -> Path:
    return secret_path.with_name(secret_path.name + ".agreement")


def _shape(args: argparse.Namespace) -> CkksShape:
    try:
        sizes = tuple(int(x) for x in args.coeff_mod_bit_sizes.split(","))
    except ValueError:
        raise UsageError("--coeff-mod-bit-sizes must be comma-separated integers") from None
    shape = CkksShape(args.poly_modulus_degree, sizes, args.scale_bits)
    try:
        shape.key_params()
    except SecAggError as exc:
        raise UsageError(f"CKKS parameters: {exc}") from None
    return shape


def run(args: argparse.Namespace) -> int:
    if args.step == "session":
        print(new_session_id().hex())
        return 0
    config, secret_path = _ckks_config(args.config)
    if args.step == "announce":
        session = _session(args.session)
        agreement, announcement = announce(config.identity, config.client_id, session)
        save_agreement_key(agreement, session, _agreement_path(secret_path))
        write_announcement(announcement, args.out)
        print(f"wrote {args.out}; send it to the key dealer")
        return 0
    if args.step == "deal":
        session = _session(args.session)
        announcements = [read_announcement(path) for path in args.announcements]
        try:
            dealt = deal(
                config.identity,
                config.client_id,
                session,
                _shape(args),
                announcements,
                config.roster,
            )
        except SecAggError as exc:
            raise UsageError(f"dealing refused: {type(exc).__name__}: {exc}") from None
        save_secret_context(dealt.secret, secret_path)
        write_public_context(dealt.public_file, args.public_out)
        args.sealed_dir.mkdir(parents=True, exist_ok=True)
        for client_id, sealed in sorted(dealt.sealed_files.items()):
            (args.sealed_dir / f"sealed-{client_id}.bin").write_bytes(sealed)
        print(
            f"fingerprint {dealt.secret.fingerprint.hex()}: public context {args.public_out} "
            f"(for the coordinator), {len(dealt.sealed_files)} sealed files in {args.sealed_dir}"
        )
        return 0
    agreement_path = _agreement_path(secret_path)
    agreement, session = load_agreement_key(agreement_path)
    if not args.sealed.is_file():
        raise UsageError(f"{args.sealed}: no such sealed file")
    secret = open_sealed(
        args.sealed.read_bytes(), agreement, session, config.client_id, config.roster, args.sealed
    )
    save_secret_context(secret, secret_path)
    agreement_path.unlink()  # one key distribution only
    print(f"stored the secret context (fingerprint {secret.fingerprint.hex()}) in {secret_path}")
    return 0
