"""Write an identity key per institution and the roster: ``python -m fedsec_flower_example.keys
--institutions 4 --out keys``. Each institution keeps its own key file; every node and the
coordinator hold the roster (public keys only)."""

from __future__ import annotations

import argparse
import sys

from fedsec_flower_example.task import ExampleSettings, write_keys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--institutions", type=int, default=ExampleSettings().institutions)
    parser.add_argument("--out", default="keys")
    args = parser.parse_args(argv)
    if args.institutions < 3:
        print("error: --institutions must be >= 3", file=sys.stderr)
        return 2
    out = write_keys(ExampleSettings(institutions=args.institutions, keys_dir=args.out))
    print(f"wrote {args.institutions} identity keys and {out / 'roster.toml'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
