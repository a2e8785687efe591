"""The fingerprint of a federation file that a node signs into its handshakes
(:mod:`mesh.federation_print`): canonical JSON of what the file says, so comments,
order of keys and layout do not count, and every replica that shares a meaning shares
a digest.

What must agree is what the ledger and the channels rest on: the federation id, each
DC's name and keys, the operators and their roles, and ``[modes]``. Two things are a
DC's own and are left out: ``[federation] versions`` (its offer; a DC may be taken down
to v1 for a rollback, docs/federation.md) and the endpoints (where a DC reaches
another may differ from where a third one does: a NAT, a relay in between)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import attrs

from federation.config import DCConfig, Federation
from mesh.federation_print import FederationPrint

__all__ = ["federation_print", "dc_entry"]


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def dc_entry(dc: DCConfig) -> dict[str, Any]:
    return {"name": dc.name, "public_key": str(dc.public_key),
            "previous_keys": [str(k) for k in dc.previous_keys]}


def federation_print(fed: Federation) -> FederationPrint:
    doc = {
        "id": fed.id,
        "modes": attrs.asdict(fed.modes),
        "dcs": sorted((dc_entry(dc) for dc in fed.dcs), key=lambda d: d["name"]),
        "operators": sorted(({"name": o.name, "public_key": str(o.public_key),
                              "role": o.role.label} for o in fed.operators),
                            key=lambda o: o["name"]),
    }
    return FederationPrint.of(hashlib.sha256(_canonical(doc)).digest(),
                              ((dc.name, _canonical(dc_entry(dc))) for dc in fed.dcs))
