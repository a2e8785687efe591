"""The federation file: TOML that lists the DCs of a federation and their keys.

::

    [federation]
    id = "example"                 # bound into every channel handshake
    versions = [1, 3]              # transfer protocol versions this federation allows

    [modes]                        # link mode thresholds (DESIGN.md, "Link modes")
    datacenter_rtt_ms = 10.0
    ...

    [[dc]]
    name = "dc1"
    public_key = "ed25519:..."
    control = "127.0.0.1:7101"     # websocket control listener
    data = "127.0.0.1:7201"        # AMST bulk listener
    api = "127.0.0.1:7301"         # HTTP API and dashboard

    [[operators]]                  # people: their keys sign every state-changing request
    name = "alice"
    public_key = "ed25519:..."     # made with 'dwcp keygen --operator'; never a DC's key
    role = "admin"                 # viewer < operator < admin

Every error names the file and the field (``federation.toml: dc[2].control:
...``). Unknown options are errors, not silently ignored: a typo in a
threshold must not leave a default in force.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs

from consensus.authz import Operator, OperatorTable, Role, parse_role
from mesh import versions as transfer_versions
from mesh.identity import IdentityError, PublicKey, parse_public_key
from mesh.links.modes import ModeLimits

__all__ = ["ConfigError", "Endpoint", "DCConfig", "ModeThresholds", "Federation", "Operator",
           "Role", "load", "loads"]

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class ConfigError(Exception):
    """A federation file that cannot be used; the message names the file and field."""


@attrs.frozen
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


#: The ``[modes]`` table is the mesh's own mode limits (one class, one set of defaults).
ModeThresholds = ModeLimits


@attrs.frozen
class DCConfig:
    name: str
    public_key: PublicKey
    control: Endpoint
    data: Endpoint
    api: Endpoint
    region: str = ""
    #: keys this DC signed with before ``dwcp federation rotate-key``: still accepted on
    #: the ledger's signed messages (its durable history holds them), never on a channel
    previous_keys: tuple[PublicKey, ...] = ()


@attrs.frozen
class Federation:
    id: str
    dcs: tuple[DCConfig, ...]
    versions: tuple[int, ...] = transfer_versions.KNOWN
    modes: ModeThresholds = ModeThresholds()
    source: str = "<memory>"
    #: the people who may sign requests (consensus.authz); none: no state can change
    operators: tuple[Operator, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(dc.name for dc in self.dcs)

    def operator_table(self) -> OperatorTable:
        """The operators as every replica's ledger checks them."""
        return OperatorTable.of(self.id, self.operators)

    def dc(self, name: str) -> DCConfig:
        for dc in self.dcs:
            if dc.name == name:
                return dc
        raise ConfigError(f"{self.source}: no DC named {name!r} (known: {', '.join(self.names)})")

    def public_keys(self) -> dict[str, PublicKey]:
        return {dc.name: dc.public_key for dc in self.dcs}

    def previous_keys(self) -> dict[str, tuple[PublicKey, ...]]:
        """The DCs' keys before a rotation, for the ledger's signed history."""
        return {dc.name: dc.previous_keys for dc in self.dcs if dc.previous_keys}


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = {"federation", "modes", "dc", "operators"}
_FED_KEYS = {"id", "versions"}
_DC_KEYS = {"name", "public_key", "control", "data", "api", "region", "previous_keys"}
_OPERATOR_KEYS = {"name", "public_key", "role"}


def _fail(source: str, where: str, why: str) -> ConfigError:
    return ConfigError(f"{source}: {where}: {why}")


def _unknown(source: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        prefix = f"{where}." if where else ""
        raise _fail(
            source, f"{prefix}{extra[0]}", f"unknown option (allowed: {', '.join(sorted(allowed))})"
        )


def _table(source: str, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(source, where, f"expected a table, got {type(value).__name__}")
    return value


def _str(source: str, where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _fail(source, where, f"expected a string, got {value!r}")
    return value


def _entry(source: str, where: str, raw: Any, allowed: set[str],
           required: tuple[str, ...]) -> dict[str, Any]:
    """One ``[[dc]]`` or ``[[operators]]`` table: no unknown option, none missing."""
    entry = _table(source, where, raw)
    _unknown(source, where, entry, allowed)
    for name in required:
        if name not in entry:
            raise _fail(source, f"{where}.{name}", "missing")
    return entry


def _unique_name(source: str, where: str, entry: dict[str, Any], seen: dict[str, int],
                 what: str) -> str:
    """``entry``'s name: a valid name not used by an earlier table of ``what``."""
    name = _str(source, f"{where}.name", entry["name"])
    if not _NAME_RE.match(name):
        raise _fail(source, f"{where}.name", f"{name!r} must be 1-63 of a-z, 0-9, '-'")
    if name in seen:
        kind = "DC" if what == "dc" else "operator"
        raise _fail(source, f"{where}.name",
                    f"duplicate {kind} name {name!r} (also {what}[{seen[name]}])")
    seen[name] = len(seen)
    return name


def _public_key(source: str, where: str, entry: dict[str, Any]) -> PublicKey:
    try:
        return parse_public_key(_str(source, f"{where}.public_key", entry["public_key"]))
    except IdentityError as exc:
        raise _fail(source, f"{where}.public_key", str(exc)) from None


def parse_endpoint(source: str, where: str, value: Any) -> Endpoint:
    text = _str(source, where, value)
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise _fail(source, where, f"expected 'host:port' or '[v6]:port', got {text!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise _fail(source, where, f"port {port} is outside 1..65535")
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _fail(source, where, f"{host!r} is not an IPv6 address") from None
    elif not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
        raise _fail(source, where, f"{host!r} is not a host name or address")
    return Endpoint(host, port)


def _modes(source: str, raw: dict[str, Any]) -> ModeThresholds:
    defaults = ModeThresholds()
    allowed = {a.name for a in attrs.fields(ModeThresholds)}
    _unknown(source, "modes", raw, allowed)
    values: dict[str, Any] = {}
    for name in sorted(raw):
        v = raw[name]
        where = f"modes.{name}"
        if name == "hysteresis":
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 100:
                raise _fail(source, where, f"expected an integer in 1..100, got {v!r}")
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise _fail(source, where, f"expected a non-negative number, got {v!r}")
            v = float(v)
            if name.endswith("_loss") and v > 1:
                raise _fail(source, where, f"a loss rate is a fraction in 0..1, got {v}")
        values[name] = v
    # Check the merged values before building: the class's own checks do not name the file.
    merged = {a.name: getattr(defaults, a.name) for a in attrs.fields(ModeThresholds)} | values
    modes = SimpleNamespace(**merged)
    if modes.datacenter_rtt_ms > modes.internet_rtt_ms:
        raise _fail(source, "modes.datacenter_rtt_ms", "must not exceed modes.internet_rtt_ms")
    if modes.datacenter_bandwidth_mbps < modes.internet_bandwidth_mbps:
        raise _fail(
            source,
            "modes.datacenter_bandwidth_mbps",
            "must not be below modes.internet_bandwidth_mbps",
        )
    if modes.datacenter_loss > modes.internet_loss:
        raise _fail(source, "modes.datacenter_loss", "must not exceed modes.internet_loss")
    return ModeThresholds(**merged)


def loads(text: str, source: str = "<string>") -> Federation:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    _unknown(source, "", doc, _TOP_KEYS)
    if "federation" not in doc:
        raise _fail(source, "federation", "missing table [federation]")
    fed = _table(source, "federation", doc["federation"])
    _unknown(source, "federation", fed, _FED_KEYS)
    if "id" not in fed:
        raise _fail(source, "federation.id", "missing")
    fed_id = _str(source, "federation.id", fed["id"])
    if not _NAME_RE.match(fed_id):
        raise _fail(source, "federation.id", f"{fed_id!r} must be 1-63 of a-z, 0-9, '-'")
    versions = fed.get("versions", list(transfer_versions.KNOWN))
    if (
        not isinstance(versions, list)
        or not versions
        or any(
            not isinstance(v, int) or isinstance(v, bool) or v not in transfer_versions.KNOWN
            for v in versions
        )
    ):
        raise _fail(
            source,
            "federation.versions",
            f"expected a non-empty list from {list(transfer_versions.KNOWN)}, got {versions!r}",
        )
    modes = _modes(source, _table(source, "modes", doc.get("modes", {})))
    raw_dcs = doc.get("dc")
    if not isinstance(raw_dcs, list) or not raw_dcs:
        raise _fail(source, "dc", "expected at least one [[dc]] table")
    dcs: list[DCConfig] = []
    seen_names: dict[str, int] = {}
    seen_endpoints: dict[tuple[str, int], str] = {}
    seen_keys: dict[bytes, str] = {}
    for i, raw in enumerate(raw_dcs):
        where = f"dc[{i}]"
        entry = _entry(source, where, raw, _DC_KEYS, ("name", "public_key", "control", "data",
                                                         "api"))
        name = _unique_name(source, where, entry, seen_names, "dc")
        key = _public_key(source, where, entry)
        if key.raw in seen_keys:
            raise _fail(source, f"{where}.public_key", f"same key as DC {seen_keys[key.raw]!r}")
        seen_keys[key.raw] = name
        endpoints = {}
        for kind in ("control", "data", "api"):
            ep = parse_endpoint(source, f"{where}.{kind}", entry[kind])
            slot = (ep.host, ep.port)
            if slot in seen_endpoints:
                raise _fail(
                    source, f"{where}.{kind}", f"{ep} is already used by {seen_endpoints[slot]}"
                )
            seen_endpoints[slot] = f"{name}.{kind}"
            endpoints[kind] = ep
        region = _str(source, f"{where}.region", entry.get("region", ""))
        previous = _previous_keys(source, f"{where}.previous_keys",
                                  entry.get("previous_keys", []), key)
        dcs.append(
            DCConfig(name, key, endpoints["control"], endpoints["data"], endpoints["api"], region,
                     previous)
        )
    operators = _operators(source, doc.get("operators", []), seen_keys)
    return Federation(fed_id, tuple(dcs), tuple(sorted(set(versions))), modes, source,
                      operators)


def _previous_keys(source: str, where: str, raw: Any, current: PublicKey,
                   ) -> tuple[PublicKey, ...]:
    if not isinstance(raw, list):
        raise _fail(source, where, "expected a list of keys")
    out: list[PublicKey] = []
    for i, text in enumerate(raw):
        try:
            key = parse_public_key(_str(source, f"{where}[{i}]", text))
        except IdentityError as exc:
            raise _fail(source, f"{where}[{i}]", str(exc)) from None
        if key == current or key in out:
            raise _fail(source, f"{where}[{i}]", f"{key} is listed twice")
        out.append(key)
    return tuple(out)


def _operators(source: str, raw: Any, dc_keys: dict[bytes, str]) -> tuple[Operator, ...]:
    """The ``[[operators]]`` tables; a key may belong to one party only (a DC holding an
    operator's key could act alone, which is what operators are there to prevent)."""
    if not isinstance(raw, list):
        raise _fail(source, "operators", "expected [[operators]] tables")
    out: list[Operator] = []
    seen: dict[str, int] = {}
    keys: dict[bytes, str] = {}
    for i, item in enumerate(raw):
        where = f"operators[{i}]"
        entry = _entry(source, where, item, _OPERATOR_KEYS, ("name", "public_key", "role"))
        name = _unique_name(source, where, entry, seen, "operators")
        key = _public_key(source, where, entry)
        if key.raw in dc_keys:
            raise _fail(source, f"{where}.public_key",
                        f"is DC {dc_keys[key.raw]!r}'s key; an operator has a key of its own "
                        "('dwcp keygen --operator')")
        if key.raw in keys:
            raise _fail(source, f"{where}.public_key", f"same key as operator {keys[key.raw]!r}")
        keys[key.raw] = name
        try:
            role = parse_role(_str(source, f"{where}.role", entry["role"]))
        except ValueError as exc:
            raise _fail(source, f"{where}.role", str(exc)) from None
        out.append(Operator(name, key, role))
    return tuple(out)


def load(path: str | Path) -> Federation:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such federation file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    return loads(text, str(path))


def render(fed_id: str, dcs: list[dict[str, str]], modes: ModeThresholds | None = None,
           operators: list[dict[str, str]] | None = None) -> str:
    """Write a federation file (used by ``dwcp federation init`` and the demo)."""
    lines = ["[federation]", f'id = "{fed_id}"', "versions = [1, 3]", ""]
    if modes is not None:
        lines.append("[modes]")
        for a in attrs.fields(ModeThresholds):
            lines.append(f"{a.name} = {getattr(modes, a.name)!r}")
        lines.append("")
    for dc in dcs:
        lines.append("[[dc]]")
        for k in ("name", "public_key", "control", "data", "api", "region"):
            if k in dc:
                lines.append(f'{k} = "{dc[k]}"')
        lines.append("")
    for op in operators or []:
        lines.append("[[operators]]")
        for k in ("name", "public_key", "role"):
            lines.append(f'{k} = "{op[k]}"')
        lines.append("")
    return "\n".join(lines)
