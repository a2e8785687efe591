"""``dwcp bench mesh --record``: a sweep stopped part-way resumes without running a run twice,
and its figures are those of every recorded run, as an uninterrupted sweep's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import mesh
from federation.cli.main import CommandError

# crash-one at N = 4, crashed at 31 s (just after the 30 s warm-up): about a second a run
SMALL = ["--nodes", "4", "--scenarios", "crash-one", "--crash-at", "31", "--jobs", "1"]


def _bench(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    mesh.register(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["mesh", "--json", *argv])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    del out["wall_seconds"]
    return out


def test_record_resumes_a_stopped_sweep_and_pools_every_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "runs.jsonl"
    ran: list[int] = []
    real_one = mesh._one

    def counting_one(job: mesh.Job) -> dict[str, Any]:
        ran.append(job[1])
        return real_one(job)

    monkeypatch.setattr(mesh, "_one", counting_one)
    first = _bench(["--seeds", "1-2", "--record", str(record), *SMALL], capsys)
    assert ran == [1, 2]
    lines = [json.loads(x) for x in record.read_text().splitlines()]
    assert [(r["seed"], r["nodes"], r["params"]["crash_at"]) for r in lines] == \
        [(1, 4, 31.0), (2, 4, 31.0)]
    assert first["scenarios"]["crash-one"]["runs"] == 2

    # the "stopped" sweep resumes: only seed 3 runs; the figures pool all three
    resumed = _bench(["--seeds", "1-3", "--record", str(record), *SMALL], capsys)
    assert ran == [1, 2, 3]
    assert len(record.read_text().splitlines()) == 3
    ran.clear()
    plain = _bench(["--seeds", "1-3", *SMALL], capsys)
    assert ran == [1, 2, 3]
    assert resumed == plain

    # a run with other parameters is another run: it is not taken from the record
    _bench(["--seeds", "1", "--record", str(record), *SMALL[:-4], "--crash-at", "32",
            "--jobs", "1"], capsys)
    assert ran == [1, 2, 3, 1]


def test_a_bad_record_line_is_refused_naming_the_line_and_field(tmp_path: Path) -> None:
    record = tmp_path / "runs.jsonl"
    good = {"scenario": "crash-one", "seed": 1, "nodes": 4, "params": {}, "ok": True,
            "metrics": {}, "replay": "dwcp sim run crash-one --seed 1", "wall_seconds": 1.0}
    record.write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "seed": "1"}) + "\n")
    with pytest.raises(CommandError, match=r"line 3: field 'seed'"):
        mesh.load_record(str(record))
    record.write_text("{not json\n")
    with pytest.raises(CommandError, match=r"line 1: not JSON"):
        mesh.load_record(str(record))
    record.write_text(json.dumps({**good, "seed": True}) + "\n")
    with pytest.raises(CommandError, match=r"field 'seed'"):
        mesh.load_record(str(record))
    assert mesh.load_record(str(tmp_path / "absent.jsonl")) == {}


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.builds(json.dumps, st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["scenario", "seed", "nodes", "params", "ok", "metrics", "replay",
                         "wall_seconds", "x"]), inner, max_size=9),
    max_leaves=12))), max_size=4))
def test_any_record_text_loads_or_is_refused_by_name(tmp_path_factory: Any,
                                                     lines: list[str]) -> None:
    path = tmp_path_factory.mktemp("rec") / "runs.jsonl"
    path.write_text("\n".join(line.replace("\n", " ").replace("\r", " ") for line in lines),
                    encoding="utf-8")
    try:
        held = mesh.load_record(str(path))
    except CommandError as e:
        assert "--record" in str(e) and "line" in str(e)
    else:
        assert all(isinstance(run["seed"], int) for run in held.values())
