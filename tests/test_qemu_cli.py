"""``dwcp vm create|start|stop|console`` on a local qemu backend directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from federation.cli.main import main
from federation.demo.qemu_guest.build import guest_cmdline, load_assets
from federation.demo.qemu_guest.console import wait_console
from tests.harness.qemu import BOOT_TIMEOUT, qemu_missing


def _dirs(tmp_path: Path) -> list[str]:
    return ["--root", str(tmp_path / "vms"), "--ram-root", str(tmp_path / "ram")]


def test_create_names_what_is_wrong_and_creates_nothing(tmp_path: Path, capsys) -> None:
    d = _dirs(tmp_path)
    assert main(["vm", "create", "a", *d, "--kernel", "k"]) == 2
    assert "missing --initrd, --memory-mib" in capsys.readouterr().err
    (tmp_path / "k").write_bytes(b"k")
    (tmp_path / "i").write_bytes(b"i")
    assert main(["vm", "create", "a", *d, "--kernel", str(tmp_path / "k"), "--initrd",
                 str(tmp_path / "i"), "--memory-mib", "8"]) == 2
    assert "memory_mib" in capsys.readouterr().err
    assert main(["vm", "create", "a", *d, "--kernel", str(tmp_path / "k"), "--initrd",
                 str(tmp_path / "i"), "--memory-mib", "128", "--qemu-arg=-incoming"]) == 2
    assert "set by DWCP itself" in capsys.readouterr().err
    spec = tmp_path / "vm.toml"
    spec.write_text(f'kernel = "{tmp_path / "k"}"\ninitrd = "{tmp_path / "i"}"\n'
                    'memory_mib = 128\ndisks = ["absent.img"]\n')
    assert main(["vm", "create", "a", *d, "--spec", str(spec)]) == 2
    assert "absent.img" in capsys.readouterr().err
    assert main(["vm", "start", "a", *d]) == 2
    assert "no VM 'a'" in capsys.readouterr().err
    assert not (tmp_path / "vms" / "a").exists()


@pytest.mark.skipif(qemu_missing() is not None, reason=str(qemu_missing()))
def test_create_start_console_stop_a_guest(tmp_path: Path, capsys) -> None:
    assets = load_assets()
    shm = Path("/dev/shm") / f"dwcp-cli-test-{tmp_path.name}"
    d = ["--root", str(tmp_path / "vms"), "--ram-root", str(shm)]
    spec = tmp_path / "vm.toml"
    spec.write_text(f'kernel = "{assets.kernel}"\ninitrd = "{assets.initrd}"\n'
                    f'memory_mib = 128\nappend = "{guest_cmdline(0, False)}"\n')
    try:
        assert main(["vm", "create", "g", *d, "--spec", str(spec)]) == 0
        # RAM and the 4 MiB device image
        assert "g: stopped, epoch 0, 33792 pages" in capsys.readouterr().out
        assert main(["vm", "start", "g", *d, "--accel", "tcg"]) == 0
        assert "g: running" in capsys.readouterr().out
        console = tmp_path / "vms" / "g" / "console.log"
        wait_console([console], lambda c: c.last_heartbeat >= 3, BOOT_TIMEOUT, "a heartbeat")
        assert main(["vm", "start", "g", *d, "--accel", "tcg"]) == 0  # attaches: no reboot
        assert main(["vm", "console", "g", *d, "--lines", "0"]) == 0
        out = capsys.readouterr().out
        assert out.count("DWCP-T0") == 1 and "DWCP-HB 3" in out
    finally:
        assert main(["vm", "stop", "g", *d]) == 0
        shutil.rmtree(shm, ignore_errors=True)
    assert "g: stopped" in capsys.readouterr().out
