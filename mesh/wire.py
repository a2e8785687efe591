"""The wire format: a registry of message classes and their strict CBOR codec.

Every message is an attrs frozen class registered under a type tag with
``@message("tag")``; its fields are declared with :func:`field` and a *kind*
(``U64``, ``Bytes(max_len)``, ``ListOf(kind, max_items)``, ``Struct(cls)``, ...)
that says how the value is encoded and what a decoder accepts.

A frame is the canonical CBOR (RFC 8949 §4.2.1, via cbor2) of the array::

    [frame_version, tag, [field_1, field_2, ...]]

Decoding is strict, in two steps. The fast path (:func:`_decode_fast`) lets
cbor2's C decoder read the frame with every tag, indefinite lengths and nesting
deeper than ``MAX_DEPTH`` refused before their content is read, has cbor2's C
encoder write the result back in canonical form and takes the frame only if
that gives back exactly its bytes, then checks every field against its kind
with a decoder written out per class. Any frame the fast path declines goes to
the checked path, which says why: :func:`_prescan` walks the CBOR item headers
and refuses tags, indefinite lengths, unknown simple values, non-minimal
integer heads, nesting deeper than ``MAX_DEPTH`` and any length that claims
more bytes than the frame holds, so cbor2 then never allocates more than the
frame's size, never recurses without bound, and never builds an object other
than int, bytes, str, list, dict, bool, None or float; then every field is
checked and a map or a float re-encoded to compare. The fast path takes exactly
the frames the checked path takes (see :func:`_decode_fast`); whatever is wrong,
the caller gets :class:`WireError` and nothing else, with the same message.

Speed: every message class gets a compiled encoder and decoder (one function
written out per class, closures for the nested kinds, built once) that check
the same limits without building error paths; when one declines, the generic
checked code runs again and raises the :class:`WireError` that names the field.
A frame is refused unless it is the canonical encoding of what it decodes to.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, dataclass_transform

import attrs
import cbor2

__all__ = [
    "FRAME_VERSION",
    "FRAME_VERSIONS_READ",
    "WireError",
    "message",
    "struct_type",
    "field",
    "encode",
    "encode_parts",
    "enable_decode_memo",
    "decode",
    "decode_large",
    "encode_struct",
    "decode_struct",
    "peek_tag",
    "struct_fields",
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

#: The frame format version this code writes, and the ones it reads. This is the
#: layout of a frame only; how VM state moves (the *transfer* versions, v1 baseline and
#: v3 HDE+AMST) is offered in the channel handshake (:mod:`mesh.versions`).
FRAME_VERSION = 1
FRAME_VERSIONS_READ = (1,)

#: Nesting beyond this is refused. Our deepest message (a PBFT NEW-VIEW with
#: VIEW-CHANGEs holding prepared certificates) nests 7 levels; 32 leaves room
#: and stays far below CPython's recursion limit inside cbor2.
MAX_DEPTH = 32
#: Default largest frame of a message type: 64 KiB holds any control message
#: with room to spare; bulk types declare their own limit.
DEFAULT_MAX_SIZE = 64 * 1024
#: No frame at all may exceed this (a bulk chunk of 4 MiB plus headers).
ABSOLUTE_MAX_SIZE = 8 * 1024 * 1024 + 4096
#: A byte string at least this long that ends a frame (a bulk payload, the last field of
#: ``amst.chunk``) is copied by hand instead of through cbor2, whose C codec grows its
#: output by reallocation and reads a long string in pieces: on the reference machine
#: (2 cores, under load) cbor2 took 1.8 ms to encode and 0.8 ms to decode a 1 MiB chunk,
#: one copy of it takes 0.08 ms. The frame's bytes are the same either way; 64 KiB keeps
#: every control message on the plain path.
TAIL_MIN = 64 * 1024
#: Frames up to this size are decoded by cbor2's C decoder and taken if they re-encode to
#: themselves (:func:`_decode_fast`); a larger one (a bulk chunk) goes to the checked path,
#: whose prescan reads few heads there and which copies the payload once (TAIL_MIN).
FAST_MAX = TAIL_MIN


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
    # A kind whose converter is the identity gets none: attrs would call it for the
    # field on every construction of every message, for nothing.
    converter = kind.converter if type(kind).converter is not Kind.converter else None
    return attrs.field(metadata=metadata, converter=converter, **kwargs)


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


# --------------------------------------------------------------------------- compiled codecs


_new = object.__new__
_set = object.__setattr__


class _Decline(Exception):
    """The compiled codec will not take a value; the checked code says why."""


def _decline() -> Any:
    raise _Decline


def _kind_decoder(kind: Kind) -> Callable[[Any], Any]:  # noqa: C901 - one branch per kind
    """A checker of a decoded CBOR value for ``kind``: the same checks as
    ``kind.decode``, without error paths (raises :class:`_Decline`)."""
    t = type(kind)
    if t is U64:
        hi = kind.max  # type: ignore[attr-defined]
        return lambda v: v if type(v) is int and 0 <= v <= hi else _decline()
    if t is Bytes:
        n = kind.max_len  # type: ignore[attr-defined]
        if kind.exact:  # type: ignore[attr-defined]
            return lambda v: v if type(v) is bytes and len(v) == n else _decline()
        return lambda v: v if type(v) is bytes and len(v) <= n else _decline()
    if t is Text:
        n = kind.max_len  # type: ignore[attr-defined]
        return lambda v: v if type(v) is str and len(v) <= n else _decline()
    if t is Bool:
        return lambda v: v if type(v) is bool else _decline()
    if t is ListOf:
        item, n = _kind_decoder(kind.item), kind.max_items  # type: ignore[attr-defined]
        return lambda v: (
            tuple([item(x) for x in v]) if type(v) is list and len(v) <= n else _decline()
        )
    if t is Optional:
        inner = _kind_decoder(kind.item)  # type: ignore[attr-defined]
        return lambda v: None if v is None else inner(v)
    if t is Struct:
        return _class_decoder(kind.cls)  # type: ignore[attr-defined]
    return lambda v: kind.decode(v, "")  # the rest (I64, Float, MapOf): checked code


def _kind_encoder(kind: Kind) -> Callable[[Any], Any]:
    t = type(kind)
    if t in (U64, Bytes, Text, Bool):
        dec = _kind_decoder(kind)  # the same type and limit checks, values pass unchanged
        return dec
    if t is ListOf:
        item, n = _kind_encoder(kind.item), kind.max_items  # type: ignore[attr-defined]
        return lambda v: (
            [item(x) for x in v] if type(v) is tuple and len(v) <= n else _decline()
        )
    if t is Optional:
        inner = _kind_encoder(kind.item)  # type: ignore[attr-defined]
        return lambda v: None if v is None else inner(v)
    if t is Struct:
        cls = kind.cls  # type: ignore[attr-defined]
        fields = _class_encoder(cls)
        return lambda v: fields(v) if type(v) is cls else _decline()
    return lambda v: kind.encode(v, "")


def _inline_check(kind: Kind, x: str) -> str | None:
    """The condition under which the decoded value named ``x`` is refused for ``kind``,
    as Python source, for the kinds whose check is a type and a bound (else None)."""
    t = type(kind)
    if t is U64:
        return f"type({x}) is not int or {x} < 0 or {x} > {kind.max!r}"  # type: ignore[attr-defined]
    if t is Bytes:
        op = "!=" if kind.exact else ">"  # type: ignore[attr-defined]
        return f"type({x}) is not bytes or len({x}) {op} {kind.max_len!r}"  # type: ignore[attr-defined]
    if t is Text:
        return f"type({x}) is not str or len({x}) > {kind.max_len!r}"  # type: ignore[attr-defined]
    if t is Bool:
        return f"type({x}) is not bool"
    return None


def _build_function(cls: type, spec: tuple[tuple[str, Kind], ...],
                    checks: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """A decoder of ``cls``'s field list written out as one function, the way attrs
    writes ``__init__``: the simple kinds' checks inline, the others through their
    compiled checker, then the slots filled in directly (the converters of every kind
    leave a checked decoded value as it is, and the class has no validators or
    post-init hook). The same checks as ``kind.decode``; refusal is :class:`_Decline`."""
    n = len(spec)
    names = [f"x{i}" for i in range(n)]
    lines = ["def build(v):", f"    if type(v) is not list or len(v) != {n}:",
             "        raise _Decline"]
    if n:
        lines.append(f"    ({', '.join(names)},) = v")
    namespace: dict[str, Any] = {"_Decline": _Decline, "_new": _new, "_set": _set, "cls": cls}
    for i, ((_, kind), x) in enumerate(zip(spec, names, strict=True)):
        cond = _inline_check(kind, x)
        if cond is None:
            namespace[f"c{i}"] = checks[i]
            lines.append(f"    {x} = c{i}({x})")
        else:
            lines += [f"    if {cond}:", "        raise _Decline"]
    lines.append("    o = _new(cls)")
    lines += [f"    _set(o, {name!r}, {x})" for (name, _), x in zip(spec, names, strict=True)]
    lines.append("    return o")
    exec(compile("\n".join(lines), f"<wire decoder of {cls.__qualname__}>", "exec"), namespace)  # noqa: S102 - our own source, from attrs field names
    build: Callable[[Any], Any] = namespace["build"]
    return build


def _class_decoder(cls: type) -> Callable[[Any], Any]:
    cached: Callable[[Any], Any] | None = cls.__dict__.get("_wire_decoder")
    if cached is not None:
        return cached
    spec = _fields_of(cls)
    checks = [_kind_decoder(kind) for _, kind in spec]
    n = len(spec)

    def decode_fields(v: Any) -> Any:
        if type(v) is not list or len(v) != n:
            raise _Decline
        return cls(*[check(x) for check, x in zip(checks, v, strict=True)])

    fields = attrs.fields(cls)
    positional = all(a.init and not a.kw_only for a in fields)
    plain = positional and not hasattr(cls, "__attrs_post_init__") and all(
        a.validator is None for a in fields
    )
    result = (_build_function(cls, spec, checks) if plain
              else decode_fields if positional else (lambda v: _decline()))
    cls._wire_decoder = result  # type: ignore[attr-defined]
    return result


def _class_encoder(cls: type) -> Callable[[Any], list[Any]]:
    cached: Callable[[Any], list[Any]] | None = cls.__dict__.get("_wire_encoder")
    if cached is not None:
        return cached
    spec = _fields_of(cls)
    # Written out as one function, like the decoder (_build_function): the simple
    # kinds' checks inline (their values pass unchanged), the others through
    # their compiled encoder.
    names = [f"x{i}" for i in range(len(spec))]
    lines = ["def encode_fields(o):"]
    namespace: dict[str, Any] = {"_Decline": _Decline}
    for i, ((name, kind), x) in enumerate(zip(spec, names, strict=True)):
        lines.append(f"    {x} = o.{name}")
        cond = _inline_check(kind, x)
        if cond is None:
            namespace[f"c{i}"] = _kind_encoder(kind)
            lines.append(f"    {x} = c{i}({x})")
        else:
            lines += [f"    if {cond}:", "        raise _Decline"]
    lines.append(f"    return [{', '.join(names)}]")
    exec(compile("\n".join(lines), f"<wire encoder of {cls.__qualname__}>", "exec"), namespace)  # noqa: S102 - our own source, from attrs field names
    encode_fields: Callable[[Any], list[Any]] = namespace["encode_fields"]
    cls._wire_encoder = encode_fields  # type: ignore[attr-defined]
    return encode_fields


def _fields_list(msg: Any, tag: str) -> list[Any]:
    try:
        return _class_encoder(type(msg))(msg)
    except (_Decline, WireError, TypeError, ValueError):
        return _encode_fields(msg, tag)  # raises the WireError that names the field


def struct_fields(obj: Any) -> list[Any]:
    """The field list of a message or struct as it goes into CBOR, checked as
    :func:`encode` checks it (for callers that assemble canonical CBOR from parts)."""
    return _fields_list(obj, type(obj).__name__)


def encode(msg: Any, version: int = FRAME_VERSION) -> bytes:
    """The canonical frame of a registered message."""
    head, tail = encode_parts(msg, version)
    return head + tail if tail else head


def encode_parts(msg: Any, version: int = FRAME_VERSION) -> tuple[bytes, bytes]:
    """The canonical frame of ``msg`` as ``(head, tail)``, ``head + tail == encode(msg)``:
    ``tail`` is the message's last field when it is a byte string of at least
    :data:`TAIL_MIN` bytes (the same object, not copied), else ``b""``. A bulk sender
    copies both into its own buffer, once."""
    tag = tag_of(msg)
    fields = _fields_list(msg, tag)
    tail = fields[-1] if fields and type(fields[-1]) is bytes else b""
    if len(tail) < TAIL_MIN:
        data: bytes = cbor2.dumps([version, tag, fields], canonical=True)
        tail = b""
    else:
        # The last field is the frame's last item: encode it empty (the frame then ends
        # with 0x40, an empty byte string's head) and put the real string's head there.
        empty = cbor2.dumps([version, tag, [*fields[:-1], b""]], canonical=True)
        data = empty[:-1] + _bytes_head(len(tail))
    size = len(data) + len(tail)
    if size > msg.wire_max_size:
        raise WireError(f"{tag}: encoded frame of {size} bytes exceeds {msg.wire_max_size}")
    return data, tail


def _bytes_head(n: int) -> bytes:
    """The canonical (shortest) CBOR head of a byte string of ``n`` bytes (RFC 8949 §3)."""
    if n < 24:
        return bytes((0x40 | n,))
    for ai, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes((0x40 | ai,)) + n.to_bytes(width, "big")
    raise WireError(f"a byte string of {n} bytes cannot be encoded")


class _NoTags(dict):  # type: ignore[type-arg]
    """cbor2's ``semantic_decoders``: every tag, the ones cbor2 knows (dates, bignums,
    regular expressions, shared references, ...) included, is refused before its
    content is read, so the fast path never builds anything but plain values."""

    def __contains__(self, tag: object) -> bool:
        return True

    def __getitem__(self, tag: object) -> Any:
        return _refuse_tag

    def get(self, tag: object, default: Any = None) -> Any:
        return _refuse_tag


def _refuse_tag(*args: Any) -> Any:
    raise ValueError("CBOR tags are not accepted")


_NO_TAGS = _NoTags()


def _strict_loads(data: bytes) -> Any:
    """cbor2's C decoder with tags, indefinite lengths and nesting past MAX_DEPTH refused.
    Its length claims are bounded by the frame (it reads, it does not preallocate), so
    only a frame that then re-encodes to itself is taken (:func:`_decode_fast`)."""
    return cbor2.loads(data, max_depth=MAX_DEPTH, allow_indefinite=False,
                       semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag)


def _canonical_load(data: bytes) -> Any:
    """``data``'s CBOR item if cbor2's C decoder reads it (:func:`_strict_loads`) and its C
    encoder writes it back as exactly ``data`` (canonical form), else None."""
    try:
        obj = _strict_loads(data)
        return obj if cbor2.dumps(obj, canonical=True) == data else None
    except Exception:  # any refusal: the checked path names it
        return None


#: Array levels :func:`_canonical_load_pieces` walks by hand before it hands items to
#: cbor2's C decoder: a frame's field list, and each field's array (a ledger snapshot's
#: VMs, migrations, ...), whose elements are then read one C call each.
PIECE_LEVELS = 2


def _array_head(data: bytes, pos: int) -> tuple[int, int]:
    """The element count of the definite-length array whose shortest head is at ``pos``,
    and where its first element starts; ValueError for any other head."""
    ib = data[pos]
    ai = ib & 31
    if ib >> 5 != 4 or ai > 27:
        raise ValueError("not a definite-length array")
    if ai < 24:
        return ai, pos + 1
    width = 1 << (ai - 24)
    end = pos + 1 + width
    if end > len(data):
        raise ValueError("truncated array head")
    count = int.from_bytes(data[pos + 1:end], "big")
    if count < (24 if width == 1 else 1 << (4 * width)):
        raise ValueError("array head not in its shortest form")
    return count, end


def _canonical_load_pieces(data: bytes, levels: int = PIECE_LEVELS) -> Any:
    """What :func:`_canonical_load` returns (the item if cbor2's C decoder reads it with
    :func:`_strict_loads`'s refusals and it is in canonical form, else None), without one
    C call over the whole of ``data``: the arrays ``levels`` deep are walked by hand and
    their elements decoded one C call each and re-encoded to compare (canonical CBOR of
    an array is its shortest head followed by its elements' canonical encodings, RFC 8949
    §4.2.1). A C call holds the interpreter lock throughout: a 16 MB ledger snapshot's
    one decode held it for 0.6-1.5 s, so a restore in a worker thread still stalled the
    event loop that long; element by element, the longest call is one record's."""
    fp = io.BytesIO(data)

    def elements(pos: int, count: int, depth: int) -> tuple[int, list[Any]]:
        fp.seek(pos)
        dec = cbor2.CBORDecoder(fp, max_depth=MAX_DEPTH - depth, allow_indefinite=False,
                                semantic_decoders=_NO_TAGS, tag_hook=_refuse_tag)
        out = [dec.decode() for _ in range(count)]
        end = fp.tell()
        if b"".join([cbor2.dumps(x, canonical=True) for x in out]) != data[pos:end]:
            raise ValueError("not in canonical form")
        return end, out

    def item(pos: int, level: int, depth: int) -> tuple[int, Any]:
        if pos >= len(data):
            raise ValueError("truncated")
        if data[pos] >> 5 != 4:
            end, one = elements(pos, 1, depth)
            return end, one[0]
        count, pos = _array_head(data, pos)
        if count > len(data) - pos:
            raise ValueError("array longer than the frame")
        if level == 0:
            return elements(pos, count, depth + 1)
        out = []
        for _ in range(count):
            pos, x = item(pos, level - 1, depth + 1)
            out.append(x)
        return pos, out

    try:
        end, obj = item(0, levels, 0)
    except Exception:  # any refusal: the caller's checked path names it
        return None
    return obj if end == len(data) else None


def _load(data: bytes | memoryview) -> tuple[Any, bool]:
    """One CBOR item of ``data``, prescanned; and whether its canonical form must be
    checked by re-encoding (it holds a map or a float). A long byte string that ends the
    item (:data:`TAIL_MIN`) is copied out of ``data`` once, by hand."""
    if len(data) > ABSOLUTE_MAX_SIZE:
        raise WireError(f"frame of {len(data)} bytes exceeds {ABSOLUTE_MAX_SIZE}")
    recheck, tail = _prescan(data)
    try:
        if tail < 0 or len(data) - tail < TAIL_MIN or recheck:
            return cbor2.loads(bytes(data)), recheck
        # Load the item with that string empty (its head replaced by 0x40), then put the
        # string in: it is the last leaf, at the end of the chain of last list elements.
        start = tail - len(_bytes_head(len(data) - tail))
        obj = cbor2.loads(bytes(data[:start]) + b"\x40")
    except Exception as exc:  # the prescan should make this unreachable; never leak it
        raise WireError(f"malformed CBOR: {exc}") from exc
    last = obj
    while type(last) is list and last and type(last[-1]) is list:
        last = last[-1]
    if type(last) is not list or not last or last[-1] != b"":  # the prescan saw a list
        raise WireError("malformed CBOR: the frame's trailing string is not a list element")
    last[-1] = bytes(data[tail:])
    return obj, recheck


def _fields_of_frame(cls: type, fields: Any, path: str) -> Any:
    try:
        return _class_decoder(cls)(fields)
    except (_Decline, WireError, TypeError, ValueError):
        return _decode_fields(cls, fields, path)  # raises the WireError that names the field


def decode(data: bytes | bytearray | memoryview, expect: Sequence[type] | None = None) -> Any:
    """Decode one frame, or raise :class:`WireError` saying what is wrong. A bulk frame
    may be a view into a buffer the caller reuses: only its payload is copied out.

    A frame of at most :data:`FAST_MAX` bytes goes through :func:`_decode_fast` first
    (one C decode, one C re-encode); a larger one (a bulk chunk) straight to the checked
    path, whose prescan reads few heads there and which copies the payload once."""
    data = _readable(data)
    if len(data) <= FAST_MAX:
        small = bytes(data)
        memo = _memo
        if memo is not None and len(small) <= MEMO_MAX_FRAME:
            msg = memo.get(small)
            if msg is not None and (expect is None or type(msg) in expect):
                return msg
            msg = _decode_fast(small, expect)
            if msg is not None:
                if len(memo) >= _memo_capacity:
                    del memo[next(iter(memo))]
                memo[small] = msg
                return msg
            return _decode_checked(small, expect)
        msg = _decode_fast(small, expect)
        return msg if msg is not None else _decode_checked(small, expect)
    return _decode_checked(data, expect)


#: The decode memo (:func:`enable_decode_memo`): frame bytes -> the message they decode
#: to; None (the default, and always in a node) when off.
_memo: dict[bytes, Any] | None = None
_memo_capacity = 0
#: Only frames up to this size are remembered (votes, requests, certificates' parts).
MEMO_MAX_FRAME = 8192


def enable_decode_memo(capacity: int = 8192) -> None:
    """Remember the messages of the last ``capacity`` small frames that decoded, and hand
    the same (frozen, immutable) message back when the same bytes are decoded again;
    ``capacity`` 0 turns the memo off. Decoding is a pure function of the bytes and
    ``expect`` (a hit of another type than ``expect`` allows takes the normal path, which
    refuses it), so this changes no result, only the work: the simulator turns it on,
    where the n replicas of one process decode every signed body n times or more
    (``sim.scenario``); a node does not (one replica per process, and bounded memory)."""
    global _memo, _memo_capacity
    _memo = {} if capacity > 0 else None
    _memo_capacity = capacity


def _decode_fast(data: bytes, expect: Sequence[type] | None) -> Any:
    """The frame's message if ``data`` is exactly the canonical encoding of a valid
    message, else None (then :func:`_decode_checked` says what is wrong).

    cbor2's C decoder reads the frame with tags, indefinite lengths and nesting past
    ``MAX_DEPTH`` refused (:func:`_strict_loads`); cbor2's C encoder writes what it
    read back in canonical form, and the frame must be exactly that (so no
    non-minimal head, no other key order or float width, no trailing byte); then
    the compiled class decoder checks the fields. Every field kind decodes a value
    to one that encodes to the same CBOR (lists become tuples and back, structs
    their field lists), so the frame is also ``encode(msg)``. Canonical CBOR has one
    encoding per value and the checked path accepts the canonical encoding of every
    valid message (the round-trip property tests/test_wire.py pins), so this takes
    exactly what the checked path takes, as the same message, without its Python
    walk over every item head."""
    if len(data) > ABSOLUTE_MAX_SIZE:
        return None
    obj = _canonical_load(data)
    if type(obj) is not list or len(obj) != 3:
        return None
    version, tag, fields = obj
    if type(version) is not int or version != FRAME_VERSION or type(tag) is not str:
        return None
    cls = registry.get(tag)
    if cls is None or (expect is not None and cls not in expect):
        return None
    if len(data) > cls.wire_max_size:  # type: ignore[attr-defined]
        return None
    try:
        return _class_decoder(cls)(fields)
    except (_Decline, WireError, TypeError, ValueError, RecursionError):
        return None


def _decode_checked(data: bytes | memoryview, expect: Sequence[type] | None) -> Any:
    """:func:`decode` the slow way: prescan, decode, check each field, and raise the
    :class:`WireError` that says what is wrong."""
    obj, recheck = _load(data)
    if type(obj) is not list or len(obj) != 3:
        raise WireError("a frame is the array [version, tag, fields]")
    version, tag, fields = obj
    if type(version) is not int or version not in FRAME_VERSIONS_READ:
        raise WireError(f"unsupported frame version {_short(version)}")
    if type(tag) is not str:
        raise WireError(f"message tag must be text, got {_short(tag)}")
    cls = registry.get(tag)
    if cls is None:
        raise WireError(f"unknown message type {_short(tag)}")
    if expect is not None and cls not in expect:
        raise WireError(f"unexpected message type {tag!r} here")
    if len(data) > cls.wire_max_size:  # type: ignore[attr-defined]
        raise WireError(f"{tag}: frame of {len(data)} bytes exceeds {cls.wire_max_size}")  # type: ignore[attr-defined]
    msg = _fields_of_frame(cls, fields, tag)
    # One value, one encoding: a frame in any other form is refused, so
    # encode(decode(raw)) == raw. The prescan refused non-minimal heads and
    # indefinite lengths; what is left to compare is map key order and float width.
    if recheck and cbor2.dumps([version, tag, _fields_list(msg, tag)],
                               canonical=True) != bytes(data):  # fmt: skip
        raise WireError(f"{tag}: not in canonical CBOR form (RFC 8949 §4.2)")
    return msg


def decode_large(data: bytes, cls: type, max_size: int) -> Any:
    """One frame of message type ``cls`` that may be larger than :data:`ABSOLUTE_MAX_SIZE`
    (up to ``max_size``): a ledger snapshot, which is stored and moved in chunks of its
    bytes and never travels as one frame. A frame within the absolute limit goes through
    :func:`decode`; a larger one must be exactly the canonical encoding of a valid
    message (one C decode with tags, indefinite lengths and deep nesting refused, one
    re-encode compared), else :class:`WireError`."""
    tag = cls.wire_tag  # type: ignore[attr-defined]
    if len(data) > max_size:
        raise WireError(f"{tag}: frame of {len(data)} bytes exceeds {max_size}")
    if len(data) <= FAST_MAX:
        return decode(data, expect=(cls,))
    # As decode's fast path (C decode, C re-encode compared, the compiled class
    # decoder), which takes exactly what the checked path takes, without the checked
    # path's Python prescan of every item head (1.25 s of a 10,000-VM ledger's 4.2 s
    # restore under load); a frame it refuses goes to the checked path, which names
    # what is wrong. Read element by element (_canonical_load_pieces), so a restore in
    # a worker thread never holds the interpreter lock for long.
    obj = _canonical_load_pieces(bytes(data))
    if type(obj) is list and len(obj) == 3:
        version, got, fields = obj
        if type(version) is int and version == FRAME_VERSION and got == tag:
            with contextlib.suppress(_Decline, WireError, TypeError, ValueError, RecursionError):
                return _class_decoder(cls)(fields)
    if len(data) <= ABSOLUTE_MAX_SIZE:
        return decode(data, expect=(cls,))
    if type(obj) is not list or len(obj) != 3:
        raise WireError(f"{tag}: not a frame in canonical CBOR form (RFC 8949 §4.2)")
    version, got, fields = obj
    if type(version) is not int or version not in FRAME_VERSIONS_READ:
        raise WireError(f"unsupported frame version {_short(version)}")
    if got != tag:
        raise WireError(f"unexpected message type {_short(got)} here")
    return _fields_of_frame(cls, fields, tag)


def encode_struct(obj: Any) -> bytes:
    """The canonical CBOR of a struct's field list alone (no version, no tag): the body of
    something signed whose kind the signature's context names (e.g. a gossip statement)."""
    return cbor2.dumps(struct_fields(obj), canonical=True)


def decode_struct(data: bytes | bytearray | memoryview, cls: type, max_size: int) -> Any:
    """The struct ``cls`` from :func:`encode_struct`'s bytes, checked as strictly as a frame
    (at most ``max_size`` bytes, canonical, every field of its kind); else WireError.
    As in :func:`decode`, a frame that is the canonical encoding of a valid struct is
    taken after one C decode and one re-encode; any other goes to the checked path."""
    data = _readable(data)
    if len(data) > max_size:
        raise WireError(f"{cls.__name__}: {len(data)} bytes exceeds {max_size}")
    if len(data) <= FAST_MAX:
        data = bytes(data)
        raw = _canonical_load(data)
        if raw is not None:
            with contextlib.suppress(Exception):
                return _class_decoder(cls)(raw)  # else the checked path below names it
    fields, recheck = _load(data)
    obj = _fields_of_frame(cls, fields, cls.__name__)
    if recheck and encode_struct(obj) != bytes(data):
        raise WireError(f"{cls.__name__}: not in canonical CBOR form (RFC 8949 §4.2)")
    return obj


def _readable(data: bytes | bytearray | memoryview) -> bytes | memoryview:
    """``data`` as bytes, or as a flat read-only byte view of a buffer (not copied)."""
    if type(data) is bytes:
        return data
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1 or not view.c_contiguous:
        return bytes(view)
    return view.toreadonly()


def peek_tag(data: bytes) -> str | None:
    """The type tag of a frame, read from its first bytes without decoding it; None if
    they do not start a frame of our version. A hint only: :func:`decode` decides."""
    if len(data) < 3 or data[0] != 0x83 or data[1] != FRAME_VERSION:
        return None
    head = data[2]
    if head >> 5 != 3:
        return None
    n, start = head & 0x1F, 3
    if n == 24 and len(data) > 3:
        n, start = data[3], 4
    elif n > 23:
        return None
    try:
        return data[start : start + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


# --------------------------------------------------------------------------- prescan

_SIMPLE_OK = {20, 21, 22}  # false, true, null (RFC 8949 §3.3)
_MIN_FOR_AI = {24: 24, 25: 256, 26: 65536, 27: 2**32}


def _prescan(data: bytes | memoryview) -> tuple[bool, int]:  # noqa: C901 - one loop, kept flat for speed
    """Check that ``data`` is exactly one well-formed CBOR item we accept, with
    minimal heads and definite lengths. Returns whether it holds a map or a float (whose
    canonical form the prescan does not check), and where the content of a byte string
    that ends the item starts (-1 if the item does not end with one)."""
    end = len(data)
    pos = 0
    recheck = False
    tail = -1
    # Items still expected at the open level (``left``) and at the levels around it.
    outer: list[int] = []
    left = 1
    while True:
        if not left:
            if not outer:
                break
            left = outer.pop()
            continue
        left -= 1
        if pos >= end:
            raise WireError("truncated CBOR")
        head = data[pos]
        pos += 1
        major = head >> 5
        arg = head & 0x1F
        if arg >= 24:
            if arg > 27:
                raise WireError("indefinite-length or reserved CBOR item")
            ai = arg
            n = 1 << (ai - 24)
            if pos + n > end:
                raise WireError("truncated CBOR")
            arg = int.from_bytes(data[pos : pos + n], "big")
            pos += n
            if major != 7 and arg < _MIN_FOR_AI[ai]:
                raise WireError("non-canonical CBOR integer head")
            if major == 7:
                if ai == 24:
                    raise WireError("CBOR simple value is not accepted")
                # half, single, double float; NaN/inf are refused by Float.check
                recheck = True
                continue
        elif major == 7:
            if arg not in _SIMPLE_OK:
                raise WireError(f"CBOR simple value {arg} is not accepted")
            continue
        if major < 2:
            continue
        if major < 4:
            if arg > end - pos:
                raise WireError("CBOR string runs past the end of the frame")
            if major == 3:
                try:
                    str(data[pos : pos + arg], "utf-8")
                except UnicodeDecodeError as exc:
                    raise WireError("invalid UTF-8 in CBOR text") from exc
            elif pos + arg == end:
                tail = pos
            pos += arg
            continue
        if major == 6:
            raise WireError("CBOR tags are not accepted")
        if major == 5:
            recheck = True
            arg *= 2
        # Every item takes at least one byte: a count beyond what is left is a lie.
        if arg > end - pos:
            raise WireError("CBOR container claims more items than the frame holds")
        if len(outer) + 1 >= MAX_DEPTH:
            raise WireError(f"CBOR nesting deeper than {MAX_DEPTH}")
        outer.append(left)
        left = arg
    if pos != end:
        raise WireError(f"{end - pos} trailing bytes after the CBOR item")
    return recheck, tail
