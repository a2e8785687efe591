"""The node path's v3 source chunks pages by similarity at a high zstd level, as the
in-process LiveMigration does (mesh.hde.similar.similar_at): in-process nodes, real TCP
on loopback, the chunk level forced, the chunk plans the source encodes recorded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import trio

import federation.dataplane.v3 as v3
import federation.dataplane.v3_source as v3_source
from federation.dataplane.v3_target import V3Receiver
from mesh.hde.messages import CHUNK_PAGES
from mesh.hde.similar import SIMILAR_FROM_LEVEL, SketchAhead, sketch
from tests.harness.node import (
    image_hashes,
    import_vm,
    make_federation,
    migrate,
    running_nodes,
    set_policy,
    wait_outcome,
    wait_vm,
)

PAGE = 4096
#: pages ``j`` and ``j + SPREAD`` hold the same text but for their last bytes: equal
#: sketches (mesh.hde.similar.SKETCH_SPAN), far more than one chunk apart
SPREAD = 4 * CHUNK_PAGES


def _text_page(rng: random.Random) -> bytes:
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(900)]
    body = b"".join(w + (b"\n" if rng.random() < 0.1 else b" ") for w in words)
    return body[:PAGE]


def _memory(path: Path) -> Path:
    rng = random.Random(17)
    firsts = [_text_page(rng) for _ in range(SPREAD)]
    seconds = [p[:-8] + b"%08d" % j for j, p in enumerate(firsts)]
    for a, b in zip(firsts, seconds, strict=True):
        assert a != b and sketch(a) is not None and sketch(a) == sketch(b)
    path.write_bytes(b"".join(firsts + seconds))
    return path


def test_node_source_plans_by_similarity_from_the_level(tmp_path: Path,
                                                        monkeypatch: Any) -> None:
    """vm1 moves at level 1 (pages in ascending order), vm2 at SIMILAR_FROM_LEVEL (every
    page in one chunk with its look-alike); both arrive intact."""
    cfg = make_federation(tmp_path / "fed")
    (tmp_path / "vm").mkdir()
    memory = _memory(tmp_path / "vm" / "memory.img")
    plans: list[tuple[int, list[int]]] = []
    real_encode = v3_source.encode_chunk

    def recording(transfer: int, plan: Any, image: Any, ref: Any, lvl: int,
                  **kw: Any) -> bytes | bytearray:
        plans.append((level[0], plan.pages))
        levels.append((level[0], lvl))
        return real_encode(transfer, plan, image, ref, lvl, **kw)

    level = [1]
    levels: list[tuple[int, int]] = []  # (level chosen for the migration, chunk's level)
    sketchers: list[SketchAhead] = []

    class Recorded(SketchAhead):
        def __init__(self, image: Any) -> None:
            super().__init__(image)
            sketchers.append(self)

    monkeypatch.setattr(v3_source, "encode_chunk", recording)
    monkeypatch.setattr(v3_source, "SketchAhead", Recorded)
    # the targets say nothing of what they hold (as a build before V3Held): round 1 is
    # diffed, not streamed to the cold target (v3_push.StreamSource)
    monkeypatch.setattr(V3Receiver, "_held", staticmethod(lambda *_: []))
    order: list[str] = []  # the first round: announced to the target, then the ladder
    real_announce = v3_source.V3RoundSender._announce

    def announce(self: Any, *args: Any) -> float:
        order.append("announced")
        return real_announce(self, *args)

    def choose(*_: Any) -> tuple[str, int]:
        order.append("level")
        return "datacenter", level[0]

    monkeypatch.setattr(v3, "choose_chunk_level", choose)
    monkeypatch.setattr(v3_source.V3RoundSender, "_announce", announce)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            await set_policy(dc1, 100)
            for vm, target, lvl in (("vm1", "dc2", 1), ("vm2", "dc3", SIMILAR_FROM_LEVEL)):
                level[0] = lvl
                await import_vm(dc1, vm, memory, [])
                mid = await migrate(dc1, vm, target)
                assert await wait_outcome(dc1, mid) == "committed"
                await wait_vm(nodes[target], vm, "running")
                assert image_hashes(nodes[target].backend.path(vm)) \
                    == image_hashes(dc1.backend.path(vm))
                rounds = dc1.need_core().outcomes[mid].rounds
                assert dc1.rounds.counters.paths[mid] == {"v3": rounds}

    trio.run(main)
    # each migration's first round is announced before its level is measured (the
    # target gets ready meanwhile); the rounds after it are announced as prepared
    assert order[:2] == ["announced", "level"] and order.count("level") == 2
    assert order[order.index("level", 2) - 1] == "announced"
    by_level: dict[int, list[list[int]]] = {}
    for lvl, pages in plans:
        by_level.setdefault(lvl, []).append(pages)
    assert sorted(by_level) == [1, SIMILAR_FROM_LEVEL]
    # each migration's first chunk at the level chosen for it; the governor may move the
    # next ones (mesh.hde.level.LevelGovernor), the plan stays the chosen level's
    firsts = {chosen: lvl for chosen, lvl in reversed(levels)}
    assert firsts == {1: 1, SIMILAR_FROM_LEVEL: SIMILAR_FROM_LEVEL}

    def together(chunks: list[list[int]]) -> int:
        return sum(1 for pages in chunks for p in pages if p + SPREAD in pages)

    # ascending order: a chunk is a run of neighbouring pages
    assert together(by_level[1]) == 0
    assert all(pages[-1] - pages[0] < CHUNK_PAGES for pages in by_level[1])
    # by similarity: every page shares its chunk with its look-alike
    assert together(by_level[SIMILAR_FROM_LEVEL]) == SPREAD
    # the wanted pages were sketched ahead of the plan or at it (SketchAhead; the page
    # the worker is on when the diff ends may be sketched by both), and only for the
    # migration that chunks by similarity (the memory image alone)
    assert len(sketchers) == 1
    assert 2 * SPREAD <= sketchers[0].ahead + sketchers[0].on_the_spot <= 2 * SPREAD + 1


def test_round_1_streamed_to_a_cold_target_groups_what_is_beyond_its_lead(
        tmp_path: Path, monkeypatch: Any) -> None:
    """Round 1 streamed to the cold dc2 at SIMILAR_FROM_LEVEL (v3_source._Stream): the
    first STREAM_LEAD_PAGES non-zero pages go in the order read, the rest once the copy
    ended, every page beyond the lead in one chunk with its look-alike."""
    cfg = make_federation(tmp_path / "fed")
    (tmp_path / "vm").mkdir()
    memory = _memory(tmp_path / "vm" / "memory.img")
    lead = CHUNK_PAGES // 2
    monkeypatch.setattr(v3_source, "STREAM_LEAD_PAGES", lead)
    monkeypatch.setattr(v3, "choose_chunk_level", lambda *_: ("datacenter", SIMILAR_FROM_LEVEL))
    streamed: list[list[int]] = []  # the pages of round 1's chunks (no reference)
    real_encode = v3_source.encode_chunk

    def recording(transfer: int, plan: Any, image: Any, ref: Any, lvl: int,
                  **kw: Any) -> bytes | bytearray:
        if v3_source.is_push(transfer) and ref is None:
            streamed.append(plan.pages)
        return real_encode(transfer, plan, image, ref, lvl, **kw)

    monkeypatch.setattr(v3_source, "encode_chunk", recording)

    async def main() -> None:
        async with running_nodes(cfg, tmp_path / "data") as nodes:
            dc1 = nodes["dc1"]
            await set_policy(dc1, 100)
            await import_vm(dc1, "vm1", memory, [])
            mid = await migrate(dc1, "vm1", "dc2")
            assert await wait_outcome(dc1, mid) == "committed"
            await wait_vm(nodes["dc2"], "vm1", "running")
            assert image_hashes(nodes["dc2"].backend.path("vm1")) \
                == image_hashes(dc1.backend.path("vm1"))

    trio.run(main)
    pages = [p for chunk in streamed for p in chunk]
    assert sorted(pages) == list(range(2 * SPREAD)), "every page once, in round 1"
    # the lead in the order read (its chunks hold neighbouring pages only) ...
    assert list(range(lead)) in streamed
    # ... the rest grouped: each page beyond the lead with its look-alike
    beyond = [c for c in streamed if c[0] >= lead]
    assert sum(1 for c in beyond for p in c if p + SPREAD in c) == SPREAD - lead
