"""The wire format: a registry of message classes and their strict CBOR codec.

Every message is an attrs frozen class registered under a type tag with
``@message("tag")``; its fields are declared with :func:`field` and a *kind*
(``U64``, ``Bytes(max_len)``, ``ListOf(kind, max_items)``, ``Struct(cls)``, ...)
that says how the value is encoded and what a decoder accepts.

A frame is the canonical CBOR (RFC 8949 §4.2.1, via cbor2) of the array::

    [protocol_version, tag, [field_1, field_2, ...]]

Decoding is strict. Before cbor2 sees a byte, :func:`_prescan` walks the CBOR
item headers and refuses tags, indefinite lengths, unknown simple values,
non-minimal integer heads, nesting deeper than ``MAX_DEPTH`` and any length
that claims more bytes than the frame holds. So a decoder never allocates
more than the frame's size, never recurses without bound, and never builds
an object other than int, bytes, str, list, dict, bool, None or float. Then
every field is checked against its kind. Whatever is wrong, the caller gets
:class:`WireError` and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, dataclass_transform

import attrs
import cbor2

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "WireError",
    "message",
    "struct_type",
    "field",
    "encode",
    "decode",
    "registry",
    "Kind",
    "U64",
    "I64",
    "Float",
    "Bool",
    "Bytes",
    "Text",
    "ListOf",
    "Optional",
    "Struct",
    "MapOf",
]

#: The frame format version this code writes. Channels negotiate the
#: *transfer* protocol (v1 baseline, v3 HDE+AMST) separately in the handshake.
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

#: Nesting beyond this is refused. Our deepest message (a PBFT NEW-VIEW with
#: VIEW-CHANGEs holding prepared certificates) nests 7 levels; 32 leaves room
#: and stays far below CPython's recursion limit inside cbor2.
MAX_DEPTH = 32
#: Default largest frame of a message type: 64 KiB holds any control message
#: with room to spare; bulk types declare their own limit.
DEFAULT_MAX_SIZE = 64 * 1024
#: No frame at all may exceed this (a bulk chunk of 4 MiB plus headers).
ABSOLUTE_MAX_SIZE = 8 * 1024 * 1024 + 4096


class WireError(Exception):
    """Bytes that are not a valid frame, or a message that may not be encoded."""


# --------------------------------------------------------------------------- kinds


class Kind:
    """How one field is written and what a decoder accepts for it."""

    def encode(self, value: Any, path: str) -> Any:
        self.check(value, path)
        return value

    def decode(self, obj: Any, path: str) -> Any:
        self.check(obj, path)
        return obj

    def check(self, value: Any, path: str) -> None:  # pragma: no cover - abstract
        raise WireError(f"{path}: kind {type(self).__name__} has no check")

    def converter(self, value: Any) -> Any:
        """Normalise a constructor argument (lists become tuples)."""
        return value


@attrs.frozen
class U64(Kind):
    max: int = 2**64 - 1

    def check(self, value: Any, path: str) -> None:
        if type(value) is not int or value < 0 or value > self.max:
            raise WireError(f"{path}: expected an integer in 0..{self.max}, got {_short(value)}")


@attrs.frozen
class I64(Kind):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not int or not -(2**63) <= value < 2**63:
            raise WireError(f"{path}: expected a 64-bit signed integer, got {_short(value)}")


@attrs.frozen
class Float(Kind):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not float or not math.isfinite(value):
            raise WireError(f"{path}: expected a finite float, got {_short(value)}")

    def decode(self, obj: Any, path: str) -> Any:
        # Canonical CBOR writes 1.0 as a float; an int here is a peer's bug.
        self.check(obj, path)
        return obj


@attrs.frozen
class Bool(Kind):
    def check(self, value: Any, path: str) -> None:
        if type(value) is not bool:
            raise WireError(f"{path}: expected a boolean, got {_short(value)}")


@attrs.frozen
class Bytes(Kind):
    max_len: int
    exact: bool = False

    def check(self, value: Any, path: str) -> None:
        if type(value) is not bytes:
            raise WireError(f"{path}: expected bytes, got {_short(value)}")
        if self.exact and len(value) != self.max_len:
            raise WireError(f"{path}: expected exactly {self.max_len} bytes, got {len(value)}")
        if len(value) > self.max_len:
            raise WireError(f"{path}: {len(value)} bytes exceeds the limit of {self.max_len}")

    def converter(self, value: Any) -> Any:
        return bytes(value) if isinstance(value, (bytearray, memoryview)) else value


@attrs.frozen
class Text(Kind):
    max_len: int

    def check(self, value: Any, path: str) -> None:
        if type(value) is not str:
            raise WireError(f"{path}: expected text, got {_short(value)}")
        if len(value) > self.max_len:
            raise WireError(f"{path}: {len(value)} characters exceeds the limit of {self.max_len}")


@attrs.frozen
class ListOf(Kind):
    item: Kind
    max_items: int

    def _check_len(self, value: Any, path: str) -> None:
        if not isinstance(value, (list, tuple)):
            raise WireError(f"{path}: expected a list, got {_short(value)}")
        if len(value) > self.max_items:
            raise WireError(f"{path}: {len(value)} items exceeds the limit of {self.max_items}")

    def encode(self, value: Any, path: str) -> Any:
        self._check_len(value, path)
        return [self.item.encode(v, f"{path}[{i}]") for i, v in enumerate(value)]

    def decode(self, obj: Any, path: str) -> Any:
        if type(obj) is not list:
            raise WireError(f"{path}: expected a list, got {_short(obj)}")
        self._check_len(obj, path)
        return tuple(self.item.decode(v, f"{path}[{i}]") for i, v in enumerate(obj))

    def converter(self, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(self.item.converter(v) for v in value)
        return value


@attrs.frozen
class MapOf(Kind):
    """A map with text or integer keys, kept as a tuple of sorted (key, value) pairs."""

    key: Kind
    value: Kind
    max_items: int

    def encode(self, value: Any, path: str) -> Any:
        pairs = tuple(value.items()) if isinstance(value, dict) else value
        if not isinstance(pairs, tuple) or len(pairs) > self.max_items:
            raise WireError(f"{path}: expected at most {self.max_items} pairs")
        out = {}
        for k, v in pairs:
            out[self.key.encode(k, f"{path}.key")] = self.value.encode(v, f"{path}[{k!r}]")
        if len(out) != len(pairs):
            raise WireError(f"{path}: duplicate keys")
        return out

    def decode(self, obj: Any, path: str) -> Any:
        if type(obj) is not dict:
            raise WireError(f"{path}: expected a map, got {_short(obj)}")
        if len(obj) > self.max_items:
            raise WireError(f"{path}: {len(obj)} pairs exceeds the limit of {self.max_items}")
        pairs = []
        for k, v in obj.items():
            pairs.append(
                (self.key.decode(k, f"{path}.key"), self.value.decode(v, f"{path}[{k!r}]"))
            )
        try:
            pairs.sort(key=lambda kv: kv[0])
        except TypeError as exc:
            raise WireError(f"{path}: keys of mixed types") from exc
        return tuple(pairs)

    def converter(self, value: Any) -> Any:
        if isinstance(value, dict):
            return tuple(sorted(value.items()))
        return value


@attrs.frozen
class Optional(Kind):
    item: Kind

    def encode(self, value: Any, path: str) -> Any:
        return None if value is None else self.item.encode(value, path)

    def decode(self, obj: Any, path: str) -> Any:
        return None if obj is None else self.item.decode(obj, path)

    def converter(self, value: Any) -> Any:
        return None if value is None else self.item.converter(value)


@attrs.frozen
class Struct(Kind):
    """A nested attrs class declared with :func:`struct_type` (no tag of its own)."""

    cls: type

    def encode(self, value: Any, path: str) -> Any:
        if type(value) is not self.cls:
            raise WireError(f"{path}: expected {self.cls.__name__}, got {_short(value)}")
        return _encode_fields(value, path)

    def decode(self, obj: Any, path: str) -> Any:
        return _decode_fields(self.cls, obj, path)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- registry

_FIELD_KIND = "dwcp.wire.kind"

T = TypeVar("T")

#: tag -> class, and class -> tag
registry: dict[str, type] = {}
_tags: dict[type, str] = {}


def field(kind: Kind, *, default: Any = attrs.NOTHING, factory: Any = None, **kwargs: Any) -> Any:
    """Declare a wire field of an attrs class: ``x: int = field(U64())``."""
    metadata = dict(kwargs.pop("metadata", {}) or {})
    metadata[_FIELD_KIND] = kind
    if factory is not None:
        kwargs["factory"] = factory
    else:
        kwargs["default"] = default
    return attrs.field(metadata=metadata, converter=kind.converter, **kwargs)


def _fields_of(cls: type) -> tuple[tuple[str, Kind], ...]:
    cached: tuple[tuple[str, Kind], ...] | None = cls.__dict__.get("_wire_fields")
    if cached is not None:
        return cached
    out = []
    for a in attrs.fields(cls):
        kind = a.metadata.get(_FIELD_KIND)
        if kind is None:
            raise TypeError(f"{cls.__name__}.{a.name} is not declared with wire.field()")
        out.append((a.name, kind))
    result = tuple(out)
    cls._wire_fields = result  # type: ignore[attr-defined]
    return result


@dataclass_transform(frozen_default=True, field_specifiers=(field, attrs.field))
def struct_type(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen attrs class usable as a nested :class:`Struct`."""
    cls = attrs.frozen(cls)
    _fields_of(cls)
    return cls


@dataclass_transform(frozen_default=True, field_specifiers=(field, attrs.field))
def message(tag: str, *, max_size: int = DEFAULT_MAX_SIZE) -> Callable[[type[T]], type[T]]:
    """Register ``cls`` (made a frozen attrs class) as the message type ``tag``."""
    if not 0 < max_size <= ABSOLUTE_MAX_SIZE:
        raise ValueError(f"max_size for {tag!r} must be in 1..{ABSOLUTE_MAX_SIZE}")

    def register(cls: type[T]) -> type[T]:
        cls = attrs.frozen(cls)
        if tag in registry and registry[tag].__qualname__ != cls.__qualname__:
            raise ValueError(f"wire tag {tag!r} is already registered to {registry[tag]!r}")
        cls.wire_tag = tag  # type: ignore[attr-defined]
        cls.wire_max_size = max_size  # type: ignore[attr-defined]
        _fields_of(cls)
        registry[tag] = cls
        _tags[cls] = tag
        return cls

    return register


def _encode_fields(obj: Any, path: str) -> list[Any]:
    return [
        kind.encode(getattr(obj, name), f"{path}.{name}") for name, kind in _fields_of(type(obj))
    ]


def _decode_fields(cls: type, obj: Any, path: str) -> Any:
    spec = _fields_of(cls)
    if type(obj) is not list:
        raise WireError(f"{path}: expected the field list of {cls.__name__}, got {_short(obj)}")
    if len(obj) != len(spec):
        raise WireError(f"{path}: {cls.__name__} has {len(spec)} fields, frame has {len(obj)}")
    values = {
        name: kind.decode(v, f"{path}.{name}") for (name, kind), v in zip(spec, obj, strict=True)
    }
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{path}: {cls.__name__} rejected its fields: {exc}") from exc


def tag_of(obj: Any) -> str:
    try:
        return _tags[type(obj)]
    except KeyError:
        raise WireError(f"{type(obj).__name__} is not a registered message type") from None


def encode(msg: Any, version: int = PROTOCOL_VERSION) -> bytes:
    """The canonical frame of a registered message."""
    tag = tag_of(msg)
    body = [version, tag, _encode_fields(msg, tag)]
    data: bytes = cbor2.dumps(body, canonical=True)
    if len(data) > msg.wire_max_size:
        raise WireError(f"{tag}: encoded frame of {len(data)} bytes exceeds {msg.wire_max_size}")
    return data


def decode(data: bytes | bytearray | memoryview, expect: Sequence[type] | None = None) -> Any:
    """Decode one frame, or raise :class:`WireError` saying what is wrong."""
    data = bytes(data)
    if len(data) > ABSOLUTE_MAX_SIZE:
        raise WireError(f"frame of {len(data)} bytes exceeds {ABSOLUTE_MAX_SIZE}")
    _prescan(data)
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # the prescan should make this unreachable; never leak it
        raise WireError(f"malformed CBOR: {exc}") from exc
    if type(obj) is not list or len(obj) != 3:
        raise WireError("a frame is the array [version, tag, fields]")
    version, tag, fields = obj
    if type(version) is not int or version not in SUPPORTED_VERSIONS:
        raise WireError(f"unsupported protocol version {_short(version)}")
    if type(tag) is not str:
        raise WireError(f"message tag must be text, got {_short(tag)}")
    cls = registry.get(tag)
    if cls is None:
        raise WireError(f"unknown message type {_short(tag)}")
    if expect is not None and cls not in expect:
        raise WireError(f"unexpected message type {tag!r} here")
    if len(data) > cls.wire_max_size:  # type: ignore[attr-defined]
        raise WireError(f"{tag}: frame of {len(data)} bytes exceeds {cls.wire_max_size}")  # type: ignore[attr-defined]
    msg = _decode_fields(cls, fields, tag)
    # One value, one encoding: a frame in any other form (map keys out of order,
    # a float wider than it needs) is refused, so encode(decode(raw)) == raw.
    if cbor2.dumps([version, tag, _encode_fields(msg, tag)], canonical=True) != data:
        raise WireError(f"{tag}: not in canonical CBOR form (RFC 8949 §4.2)")
    return msg


# --------------------------------------------------------------------------- prescan

_SIMPLE_OK = {20, 21, 22}  # false, true, null (RFC 8949 §3.3)
_MIN_FOR_AI = {24: 24, 25: 256, 26: 65536, 27: 2**32}


def _prescan(data: bytes) -> None:
    """Check that ``data`` is exactly one well-formed CBOR item we accept."""
    end = len(data)
    pos = 0
    # Stack of the number of items still expected at each open level.
    remaining = [1]
    while remaining:
        if remaining[-1] == 0:
            remaining.pop()
            continue
        remaining[-1] -= 1
        if pos >= end:
            raise WireError("truncated CBOR")
        head = data[pos]
        pos += 1
        major, ai = head >> 5, head & 0x1F
        if ai < 24:
            arg = ai
        elif ai <= 27:
            n = 1 << (ai - 24)
            if pos + n > end:
                raise WireError("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + n], "big")
            pos += n
            if major != 7 and arg < _MIN_FOR_AI[ai]:
                raise WireError("non-canonical CBOR integer head")
        else:
            raise WireError("indefinite-length or reserved CBOR item")
        if major in (0, 1):
            continue
        if major in (2, 3):
            if arg > end - pos:
                raise WireError("CBOR string runs past the end of the frame")
            if major == 3:
                try:
                    data[pos : pos + arg].decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise WireError("invalid UTF-8 in CBOR text") from exc
            pos += arg
            continue
        if major in (4, 5):
            count = arg * (2 if major == 5 else 1)
            # Every item takes at least one byte: a count beyond what is left is a lie.
            if count > end - pos:
                raise WireError("CBOR container claims more items than the frame holds")
            if len(remaining) >= MAX_DEPTH:
                raise WireError(f"CBOR nesting deeper than {MAX_DEPTH}")
            remaining.append(count)
            continue
        if major == 6:
            raise WireError("CBOR tags are not accepted")
        # major 7
        if ai < 24:
            if ai not in _SIMPLE_OK:
                raise WireError(f"CBOR simple value {ai} is not accepted")
        elif ai == 24:
            raise WireError("CBOR simple value is not accepted")
        # ai 25/26/27: half, single, double float; NaN/inf are refused by Float.check
    if pos != end:
        raise WireError(f"{end - pos} trailing bytes after the CBOR item")
