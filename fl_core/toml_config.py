"""Reading TOML config files with errors that name the file, the key and what was expected.

``fedsec server --config`` and ``fedsec client --config`` both read TOML (stdlib ``tomllib``).
Validation is strict: an unknown key is an error (a typo such as ``treshold`` must not silently
fall back to a default), and every value is type- and range-checked where it is read.
:class:`ConfigError` derives from :class:`fl_core.cli.UsageError`, so the CLI prints one line
instead of a traceback.

The loaders that read a file through :class:`Table` are the config schema: under
:func:`trace_keys` every key a loader reads is recorded with its type, default and range, which
is how ``docs/configuration.md`` is generated (``server/config_reference.py``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import re
import tomllib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_core.cli import UsageError

_MISSING: Any = object()


class ConfigError(UsageError):
    """A config file that cannot be read or holds a missing, unknown or out-of-range value."""


@dataclass(frozen=True)
class KeySpec:
    """One key as a loader reads it: ``file`` is the config file's name, ``name`` is
    ``table.key``; ``default`` is None when the key is required; ``limits`` says the accepted
    range or choices ("" when any). A loader that reads a key only when it is present probes it
    first (``kind`` "probe"): such a key is optional even though it has no default."""

    file: str
    name: str
    kind: str
    required: bool
    default: Any
    limits: str


_TRACE: ContextVar[list[KeySpec] | None] = ContextVar("fedsec_config_trace", default=None)


@contextlib.contextmanager
def trace_keys() -> Iterator[list[KeySpec]]:
    """Record every key read through :class:`Table` while the block runs (in read order)."""
    keys: list[KeySpec] = []
    token = _TRACE.set(keys)
    try:
        yield keys
    finally:
        _TRACE.reset(token)


def load_toml(path: Path) -> Table:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror}") from None
    return Table(data, path, "")


_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def check_host(host: str) -> str | None:
    """None if ``host`` is a DNS name or an IP address, else why not."""
    if not host:
        return "the host is empty"
    try:
        ipaddress.ip_address(host.strip("[]"))
        return None
    except ValueError:
        pass
    if not _HOSTNAME.match(host):
        return f"{host!r} is neither a host name nor an IP address"
    return None


def split_address(value: str, *, allow_port_zero: bool) -> tuple[str, int] | str:
    """(host, port) of ``host:port`` or a reason it is not one."""
    host, sep, port_text = value.rpartition(":")
    if not sep:
        return f"must be host:port, got {value!r}"
    problem = check_host(host)
    if problem is not None:
        return problem
    if not port_text.isdigit():
        return f"port {port_text!r} is not a number"
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        return f"port {port} is outside [{low}, 65535]"
    return host, port


class Table:
    """One TOML table; remembers which keys were read so :meth:`done` can reject the rest."""

    def __init__(self, data: dict[str, Any], source: Path, prefix: str) -> None:
        self._data = data
        self._source = source
        self._prefix = prefix
        self._read: set[str] = set()

    @property
    def source(self) -> Path:
        return self._source

    def _where(self, key: str) -> str:
        return f"{self._source}: {self._prefix}{key}"

    def _note(self, key: str, kind: str, default: Any, limits: str = "") -> None:
        trace = _TRACE.get()
        if trace is not None:
            required = default is _MISSING
            trace.append(
                KeySpec(
                    self._source.name,
                    self._prefix + key,
                    kind,
                    required,
                    None if required else default,
                    limits,
                )
            )

    def _get(self, key: str, default: Any) -> Any:
        self._read.add(key)
        if key in self._data:
            return self._data[key]
        if default is _MISSING:
            raise ConfigError(f"{self._where(key)} is required")
        return default

    def has(self, key: str) -> bool:
        self._note(key, "probe", None)
        return key in self._data

    def keys(self) -> tuple[str, ...]:
        return tuple(self._data)

    def table(self, key: str, required: bool = True) -> Table:
        self._note(key, "table", _MISSING if required else None)
        value = self._get(key, _MISSING if required else {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self._where(key)} must be a table, got {type(value).__name__}")
        return Table(value, self._source, f"{self._prefix}{key}.")

    def tables(self, key: str) -> list[Table]:
        """An array of tables (``[[key]]``); absent means empty."""
        self._note(key, "array of tables", None)
        value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self._where(key)} must be an array of tables ([[{key}]])")
        return [Table(v, self._source, f"{self._prefix}{key}[{i}].") for i, v in enumerate(value)]

    def string(
        self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = (), kind: str = "string"
    ) -> str:
        self._note(key, kind, default, " | ".join(choices))
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self._where(key)} must be a string")
        if choices and value not in choices:
            raise ConfigError(f"{self._where(key)} must be one of {', '.join(choices)}")
        return value

    def integer(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> int:
        self._note(key, "integer", default, _range(minimum, maximum))
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self._where(key)} must be an integer")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{self._where(key)} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._where(key)} must be <= {maximum}, got {value}")
        return value

    def integers(
        self,
        key: str,
        default: Any = _MISSING,
        minimum: int | None = None,
        maximum: int | None = None,
    ) -> tuple[int, ...]:
        """A non-empty array of integers, each range-checked."""
        self._note(key, "array of integers", default, _range(minimum, maximum))
        value = self._get(key, default)
        if (
            not isinstance(value, list | tuple)
            or not value
            or any(isinstance(v, bool) or not isinstance(v, int) for v in value)
        ):
            raise ConfigError(f"{self._where(key)} must be a non-empty array of integers")
        for v in value:
            if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
                raise ConfigError(
                    f"{self._where(key)} values must be in [{minimum}, {maximum}], got {v}"
                )
        return tuple(value)

    def number(
        self,
        key: str,
        default: Any = _MISSING,
        positive: bool = False,
        maximum: float | None = None,
    ) -> float:
        """A finite number (inf and nan are refused: no setting means "unbounded")."""
        self._note(key, "number", default, _number_range(positive, maximum))
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self._where(key)} must be a number")
        if not math.isfinite(value):
            raise ConfigError(f"{self._where(key)} must be a finite number, got {value}")
        if positive and not value > 0:
            raise ConfigError(f"{self._where(key)} must be > 0, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{self._where(key)} must be <= {maximum:g}, got {value:g}")
        return float(value)

    def address(self, key: str, default: Any = _MISSING, allow_port_zero: bool = False) -> str:
        """``host:port`` with a valid host name or IP address and a port in range."""
        value = self.string(key, default, kind="host:port")
        checked = split_address(value, allow_port_zero=allow_port_zero)
        if isinstance(checked, str):
            raise ConfigError(f"{self._where(key)}: {checked}")
        return value

    def fraction(self, key: str, default: Any = _MISSING) -> float:
        """A number in [0, 1) (a share of a cohort)."""
        with _untraced():
            value = self.number(key, default)
        self._note(key, "number", default, "[0, 1)")
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{self._where(key)} must be in [0, 1), got {value}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> bool:
        self._note(key, "boolean", default)
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self._where(key)} must be true or false")
        return value

    def path(self, key: str, default: Any = _MISSING, must_exist: bool = True) -> Path:
        """A path; relative ones are relative to the config file, not the working directory."""
        raw = self.string(key, default, kind="path" + (", must exist" if must_exist else ""))
        path = Path(raw)
        if not path.is_absolute():
            path = self._source.parent / path
        if must_exist and not path.exists():
            raise ConfigError(f"{self._where(key)}: {path} does not exist")
        return path

    def take(self, keys: Iterable[str], kind: str = "recipe") -> dict[str, Any]:
        """The raw values of those of ``keys`` present (marked read; the caller checks them and
        documents them: ``kind`` names who)."""
        out = {}
        for key in keys:
            self._note(key, kind, None)
            if key in self._data:
                self._read.add(key)
                out[key] = self._data[key]
        return out

    def where(self, key: str) -> str:
        """``file: table.key``, for a caller's own error messages."""
        return self._where(key)

    def done(self) -> None:
        unknown = sorted(set(self._data) - self._read)
        if unknown:
            raise ConfigError(
                f"{self._source}: unknown key(s) {', '.join(self._prefix + k for k in unknown)}"
            )


@contextlib.contextmanager
def _untraced() -> Iterator[None]:
    token = _TRACE.set(None)
    try:
        yield
    finally:
        _TRACE.reset(token)


def _num(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _range(minimum: float | None, maximum: float | None) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f">= {_num(minimum)}"  # type: ignore[arg-type]
    if minimum is None:
        return f"<= {_num(maximum)}"
    return f"[{_num(minimum)}, {_num(maximum)}]"


def _number_range(positive: bool, maximum: float | None) -> str:
    if positive:
        return "> 0" if maximum is None else f"(0, {_num(maximum)}]"
    return "" if maximum is None else f"<= {_num(maximum)}"
