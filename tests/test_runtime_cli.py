"""``dwcp node``: one clear line for every start-up mistake an operator can make."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from federation.cli import run_node as node_cli
from federation.cli.keys import init_federation
from federation.cli.main import CommandError
from federation.config import load


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    node_cli.register(parser.add_subparsers())
    return parser.parse_args(["node", *argv])


@pytest.fixture
def federation_dir(tmp_path: Path) -> Path:
    init_federation(tmp_path, 2, base_port=_free_block())
    return tmp_path


def _free_block() -> int:
    from federation.demo.processes import free_base_port

    return free_base_port(2)


def _error(*argv: str) -> str:
    with pytest.raises(CommandError) as info:
        node_cli.run_node(_parse(*argv))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_and_invalid_federation_files(tmp_path: Path) -> None:
    assert "no such federation file" in _error(
        "--config", str(tmp_path / "nope.toml"), "--name", "dc1"
    )
    bad = tmp_path / "bad.toml"
    bad.write_text("[federation]\nid = 'x'\nbogus = 1\n")
    assert "federation.bogus: unknown option" in _error("--config", str(bad), "--name", "dc1")


def test_unknown_dc_name(federation_dir: Path) -> None:
    message = _error("--config", str(federation_dir / "federation.toml"), "--name", "dc9")
    assert "no DC named 'dc9'" in message and "dc1, dc2" in message


def test_missing_insecure_and_foreign_keys(federation_dir: Path) -> None:
    config = str(federation_dir / "federation.toml")
    key = federation_dir / "keys" / "dc1.key"
    assert "no such key file" in _error(
        "--config", config, "--name", "dc1", "--key", "/nonexistent"
    )
    os.chmod(key, 0o644)
    assert "must not be accessible by group or others" in _error(
        "--config", config, "--name", "dc1"
    )
    os.chmod(key, 0o600)
    other = str(federation_dir / "keys" / "dc2.key")
    assert "is not 'dc1''s key" in _error("--config", config, "--name", "dc1", "--key", other)


def test_port_in_use(federation_dir: Path) -> None:
    fed = load(federation_dir / "federation.toml")
    endpoint = fed.dc("dc1").control
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((endpoint.host, endpoint.port))
        s.listen()
        message = _error("--config", str(federation_dir / "federation.toml"), "--name", "dc1")
    assert message == f"control endpoint {endpoint} is already in use"


def test_the_dwcp_command_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    code = "import sys; from federation.cli.main import main; sys.exit(main())"
    args = ["node", "--config", str(tmp_path / "missing.toml"), "--name", "dc1"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"dwcp node: {tmp_path / 'missing.toml'}: no such federation file"
    ]


def test_at_rest_key_and_retention_mistakes(federation_dir: Path) -> None:
    """The at-rest key: never readable by others, never silently replaced while sealed
    images need it; the retained copies' budget must be a size."""
    from federation.vms.sealed_image import create_sealed
    from federation.vms.sealing import SealKey

    config = str(federation_dir / "federation.toml")
    key = federation_dir / "keys" / "dc1.at-rest"
    key.write_text("dwcp-at-rest:" + "A" * 44 + "\n")
    os.chmod(key, 0o644)
    assert "at-rest key file mode is 0644" in _error("--config", config, "--name", "dc1")
    key.unlink()
    vm = federation_dir / "data" / "dc1" / "vms" / "web"
    vm.mkdir(parents=True)
    create_sealed(vm / "memory.img", SealKey(bytes(32)), 4)
    message = _error("--config", config, "--name", "dc1")
    assert "no at-rest key, but the data directory holds VM images sealed" in message
    assert not key.exists()
    nodes = federation_dir / "nodes"
    nodes.mkdir(exist_ok=True)
    (nodes / "dc1.toml").write_text('[storage]\nretained_max = "lots"\n')
    assert "storage.retained_max: 'lots' is not a size" in _error(
        "--config", config, "--name", "dc1")
