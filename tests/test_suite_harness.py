"""The test suite's own machinery (tests/harness/trio_deadline.py, groups.py): a trio
test past its time limit ends its trio run cleanly, and the tests that must not overlap
under pytest-xdist are in one group."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest

from tests.harness.groups import EXCLUSIVE, exclusive_reason
from tests.harness.trio_deadline import deadline_for

ROOT = Path(__file__).resolve().parents[1]

#: A trio test whose worker threads outlive a cancellation (abandon_on_cancel, as the
#: AMST links' crypto workers do), over its 1 s limit; then a test that runs while those
#: threads finish. Under pytest-timeout's bare alarm the first run is torn apart and
#: the threads later write to its closed wakeup socket (EBADF).
SLOW_TRIO_TEST = '''
import functools
import threading
import time

import pytest
import trio

FINISHED = threading.Semaphore(0)


def work() -> None:
    time.sleep(1.5)  # a worker blocked past the limit (a long chunk's crypto, say)
    FINISHED.release()


@pytest.mark.timeout(1)
async def test_over_its_limit() -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, work,
                                                 abandon_on_cancel=True))


def test_next() -> None:
    for _ in range(3):  # the abandoned workers finish while this test runs
        assert FINISHED.acquire(timeout=30)
'''

CONFTEST = '''
import pytest

from tests.harness.trio_deadline import give_trio_tests_deadlines


def pytest_collection_modifyitems(config, items):
    give_trio_tests_deadlines(items)
'''


def test_a_trio_test_over_its_limit_is_cancelled_cleanly(tmp_path: Path) -> None:
    (tmp_path / "test_slow.py").write_text(textwrap.dedent(SLOW_TRIO_TEST))
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W",
         "error::pytest.PytestUnraisableExceptionWarning", "-W",
         "error::pytest.PytestUnhandledThreadExceptionWarning", "test_slow.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    out = proc.stdout + proc.stderr
    assert "1 failed, 1 passed" in out, out
    assert "after its 0.5 s deadline" in out, out
    for sign in ("Errno 9", "abandoned", "INTERNALERROR", "Timeout (>"):
        assert sign not in out, out


def test_the_deadline_leaves_time_to_unwind_before_the_alarm() -> None:
    assert deadline_for(2) == 1.0
    assert deadline_for(30) == 27
    assert deadline_for(300) == 270


def test_qemu_and_netns_modules_join_the_exclusive_group() -> None:
    netns = types.ModuleType("test_netns_like")
    netns.netns_missing = netns.TbfLink = object()  # type: ignore[attr-defined]
    qemu = types.ModuleType("test_qemu_like")
    qemu.qemu_missing = object()  # type: ignore[attr-defined]
    assert exclusive_reason(netns, set()) == "its module uses TbfLink, netns_missing"
    assert exclusive_reason(qemu, set()) == "its module uses qemu_missing"
    assert exclusive_reason(None, {EXCLUSIVE}) == "marked exclusive"
    assert exclusive_reason(sys.modules[__name__], set()) is None


@pytest.mark.exclusive
def test_a_marked_test_is_in_the_group(request: pytest.FixtureRequest) -> None:
    groups = [m.args for m in request.node.iter_markers("xdist_group")]
    assert groups == [(EXCLUSIVE,)]
