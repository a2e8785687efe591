"""The node's stopgap signer: until the API checks operators' own signatures, a node
started with an operator key signs what its API asks for; the request it makes is one
the door (federation.api.auth) and the ledger accept, and a node without a key refuses."""

from __future__ import annotations

import io
import time
from pathlib import Path

import pytest

from consensus.authz import Authorization, open_authorization
from consensus.ledger import ImportVm, MigrateVm, RegisterVm
from federation import config
from federation.api.auth import ReplayWindow, load_operator_key, required_role, verify_request
from federation.node.assembly import Node, NodeError
from mesh import identity
from mesh.runtime.log import JsonLog
from tests.harness.node import make_federation


def _node(cfg: Path, tmp: Path, with_key: bool) -> Node:
    fed = config.load(cfg)
    ident = identity.load_key_file(cfg.parent / "keys" / "dc1.key")
    key = load_operator_key(cfg.parent / "keys" / "admin.key", fed) if with_key else None
    return Node(fed, "dc1", ident, tmp / "dc1", log=JsonLog("dc1", io.StringIO()), operator=key)


def test_a_node_with_an_operator_key_signs_what_the_door_and_the_ledger_accept(
    tmp_path: Path,
) -> None:
    cfg = make_federation(tmp_path / "fed")
    node = _node(cfg, tmp_path, with_key=True)
    try:
        intent = MigrateVm("web1", "dc3")
        auth = node.authorize("POST", "/api/migrations", intent, None)
        verified = verify_request(node.fed, auth.request, time.time(), ReplayWindow(),
                                  method="POST", target="/api/migrations", body=auth.body,
                                  need=required_role("POST", "/api/migrations") or
                                  config.Role.ADMIN)
        assert (verified.operator, verified.role) == ("admin", config.Role.ADMIN)
        opened, body = open_authorization(node.fed.operator_table(), auth)
        assert body == intent and opened.operator.name == "admin"
        given = node.authorize("POST", "/api/vms", ImportVm("x", "dc1", "/m"), auth)
        assert given is auth  # an operator's own request is passed on as it is
    finally:
        node.close()


def test_a_node_without_an_operator_key_refuses_to_sign(tmp_path: Path) -> None:
    cfg = make_federation(tmp_path / "fed")
    node = _node(cfg, tmp_path, with_key=False)
    try:
        with pytest.raises(NodeError, match="no operator request: this node holds no operator "
                                            r"key .*--operator-key"):
            node.authorize("POST", "/api/vms", ImportVm("x", "dc1", "/m"), None)
        big = RegisterVm("x", "dc1", Authorization(b"r" * 2000, b"b" * 3000))
        with pytest.raises(NodeError, match="as a ledger command; the limit is 4096"):
            Node._fits(big)
    finally:
        node.close()
