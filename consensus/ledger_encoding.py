"""The canonical bytes of a ledger snapshot, built from cached record encodings.

A checkpoint (every K = 128 sequence numbers) digests the whole ledger, and
the ledger only grows: encoding every record through the generic wire codec
took 358 ms at 20,000 VMs on the 2-core test machine, a stall of every replica
at every checkpoint. CBOR is concatenative (RFC 8949 §3: an array is its head
followed by its items' encodings), so the snapshot frame is assembled from the
canonical encoding of each record, computed once when the record first appears
and kept while the record object stays the same (records are frozen and
replaced on every change, so identity says "unchanged").

The bytes are exactly ``wire.encode(LedgerSnapshot(...))`` of the same state
(tests compare the two); :func:`mesh.wire.decode` reads them as usual.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any

import cbor2

from mesh import wire

__all__ = ["SnapshotEncoder", "cbor_head"]


def cbor_head(major: int, n: int) -> bytes:
    """The shortest head of a CBOR item of ``major`` type with argument ``n`` (RFC 8949 §3)."""
    if n < 24:
        return bytes([major << 5 | n])
    for ai, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | ai]) + n.to_bytes(width, "big")
    raise wire.WireError(f"CBOR argument {n} does not fit in 64 bits")


def _fields(obj: Any) -> bytes:
    """Canonical CBOR of a wire struct: the array of its fields, as inside any frame."""
    return cbor2.dumps(wire.struct_fields(obj), canonical=True)


class _Cache:
    """key -> (value object, its encoding); entries of keys no longer present go."""

    def __init__(self, encode: Callable[[Any, Any], bytes]) -> None:
        self._encode = encode
        self._enc: dict[Hashable, tuple[object, bytes]] = {}

    def array(self, values: Mapping[Any, Any]) -> bytes:
        """The CBOR array of the encodings of ``values``, in sorted key order."""
        keys = sorted(values)
        out = [cbor_head(4, len(keys))]
        fresh: dict[Hashable, tuple[object, bytes]] = {}
        for key in keys:
            value = values[key]
            hit = self._enc.get(key)
            if hit is None or hit[0] is not value:
                hit = (value, self._encode(key, value))
            fresh[key] = hit
            out.append(hit[1])
        self._enc = fresh
        return b"".join(out)


class SnapshotEncoder:
    """Builds ``wire.encode(LedgerSnapshot(vms, migrations, policy, clients))`` of a
    ledger's state without re-encoding the records that did not change."""

    def __init__(self, snapshot_cls: type, limits: tuple[int, int, int]) -> None:
        self._prefix = (
            cbor_head(4, 3) + cbor2.dumps(wire.PROTOCOL_VERSION)
            + cbor2.dumps(snapshot_cls.wire_tag)  # type: ignore[attr-defined]
            + cbor_head(4, 4)
        )
        self._max_size: int = snapshot_cls.wire_max_size  # type: ignore[attr-defined]
        self._limits = limits
        self._vms = _Cache(_record)
        self._migrations = _Cache(_record)
        self._results: dict[str, _Cache] = {}

    def encode(
        self,
        vms: Mapping[str, Any],
        migrations: Mapping[str, Any],
        policy: Any,
        clients: Mapping[str, tuple[int, Mapping[int, bytes]]],
    ) -> bytes:
        max_vms, max_migrations, max_clients = self._limits
        if len(vms) > max_vms or len(migrations) > max_migrations or len(clients) > max_clients:
            raise wire.WireError("ledger.snapshot: more records than a snapshot may hold")
        parts = [
            self._prefix,
            self._vms.array(vms),
            self._migrations.array(migrations),
            _fields(policy),
            cbor_head(4, len(clients)),
        ]
        for client in sorted(clients):
            floor, results = clients[client]
            cache = self._results.setdefault(client, _Cache(_result))
            parts.append(cbor_head(4, 3) + cbor2.dumps(client) + cbor2.dumps(floor))
            parts.append(cache.array(results))
        data = b"".join(parts)
        if len(data) > self._max_size:
            raise wire.WireError(
                f"ledger.snapshot: encoded frame of {len(data)} bytes exceeds {self._max_size}"
            )
        return data


def _record(key: Any, record: Any) -> bytes:
    return _fields(record)


def _result(request_id: int, result: bytes) -> bytes:
    """A ``ClientResult(request_id, result)``, with the limits of its fields."""
    if type(request_id) is not int or not 0 <= request_id < 2**64 or len(result) > 4096:
        raise wire.WireError(f"ledger.snapshot: client result {request_id!r} is out of range")
    return cbor2.dumps([request_id, result], canonical=True)
