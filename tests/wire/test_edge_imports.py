"""Protobuf is converted at the edge and goes no further in: only ``wire/`` and the transport
modules import the generated modules (DESIGN.md, "Dependencies flow one way")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The source packages the rule covers (tests build messages to drive the transports).
PACKAGES = ("secagg", "fl_core", "wire", "clients", "server", "proofs", "benchmarks", "examples")
PB_MODULES = frozenset({"wire.fedsec_pb2", "wire.fedsec_pb2_grpc"})
#: Where protobuf may be named: the wire package and the transports, the gRPC services and
#: clients. The round loop and the outboxes speak domain objects (server.outbox's items,
#: server.rounds.UploadHeader, wire.convert.UploadKind); server/service.py converts them.
ALLOWED = frozenset(
    {
        "server/service.py",
        "server/split_service.py",
        "clients/transport.py",
        "clients/split/transport.py",
    }
)


def _module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def pb_imports(source: str, module: str) -> list[tuple[int, str]]:
    """(line, imported name) for every import of a generated protobuf module in ``source``,
    the source of ``module`` (relative imports resolved against it)."""
    found: list[tuple[int, str]] = []
    package = module.rsplit(".", 1)[0] if "." in module else ""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name in PB_MODULES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
            found += [(node.lineno, n) for n in names if n in PB_MODULES]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            first = node.args[0]
            if (
                name in ("import_module", "__import__")
                and isinstance(first, ast.Constant)
                and first.value in PB_MODULES
            ):
                found.append((node.lineno, str(first.value)))
    return found


def _offenders() -> list[str]:
    offenders = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if relative.startswith("wire/") or relative in ALLOWED:
                continue
            for line, name in pb_imports(path.read_text(), _module_of(path)):
                offenders.append(f"{relative}:{line} imports {name}")
    return offenders


def test_only_the_wire_package_and_the_transports_import_protobuf() -> None:
    offenders = _offenders()
    assert not offenders, (
        "protobuf must be converted at the edge (wire.convert) and go no further in: "
        + "; ".join(offenders)
    )


def test_every_allowed_module_exists() -> None:
    # A moved transport would otherwise leave a stale exemption behind.
    assert all((ROOT / path).is_file() for path in ALLOWED)


def test_the_checker_sees_every_form_of_import() -> None:
    sources = {
        "from wire import fedsec_pb2 as pb": "wire.fedsec_pb2",
        "import wire.fedsec_pb2_grpc": "wire.fedsec_pb2_grpc",
        "from wire.fedsec_pb2 import RoundConfig": "wire.fedsec_pb2",
        "from . import fedsec_pb2": "wire.fedsec_pb2",
        "def f():\n    from wire import fedsec_pb2": "wire.fedsec_pb2",
        "import importlib\nimportlib.import_module('wire.fedsec_pb2')": "wire.fedsec_pb2",
    }
    for source, name in sources.items():
        assert name in [n for _, n in pb_imports(source, "wire.convert")], source
    assert pb_imports("from wire.convert import round_config_bytes", "server.x") == []
    assert pb_imports("from . import fedsec_pb2", "server.rounds") == []
