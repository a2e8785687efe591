"""Hypothesis strategies derived from the wire kinds, so every registered message type
gets a generator without anyone writing one by hand."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from hypothesis import strategies as st

from mesh import wire


def import_all_messages() -> list[type]:
    """Import every module of the product packages so that every message type is registered."""
    for pkg_name in ("mesh", "consensus", "federation", "sim"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            if not info.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(info.name)
    return [wire.registry[tag] for tag in sorted(wire.registry)]


def for_kind(kind: wire.Kind) -> st.SearchStrategy[Any]:
    if isinstance(kind, wire.U64):
        return st.integers(0, kind.max)
    if isinstance(kind, wire.I64):
        return st.integers(-(2**63), 2**63 - 1)
    if isinstance(kind, wire.Float):
        return st.floats(allow_nan=False, allow_infinity=False)
    if isinstance(kind, wire.Bool):
        return st.booleans()
    if isinstance(kind, wire.Bytes):
        if kind.exact:
            return st.binary(min_size=kind.max_len, max_size=kind.max_len)
        return st.binary(max_size=min(kind.max_len, 300))
    if isinstance(kind, wire.Text):
        return st.text(max_size=min(kind.max_len, 40))
    if isinstance(kind, wire.ListOf):
        return st.lists(for_kind(kind.item), max_size=min(kind.max_items, 4)).map(tuple)
    if isinstance(kind, wire.MapOf):
        return st.dictionaries(
            for_kind(kind.key), for_kind(kind.value), max_size=min(kind.max_items, 4)
        ).map(lambda d: tuple(sorted(d.items())))
    if isinstance(kind, wire.Optional):
        return st.none() | for_kind(kind.item)
    if isinstance(kind, wire.Struct):
        return for_class(kind.cls)
    raise TypeError(f"no strategy for wire kind {kind!r}")


def field_values(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({name: for_kind(kind) for name, kind in wire._fields_of(cls)})


def for_class(cls: type) -> st.SearchStrategy[Any]:
    """Instances of ``cls``; values its own validators refuse are filtered out."""

    def build(values: dict[str, Any]) -> Any:
        try:
            return cls(**values)
        except (TypeError, ValueError):
            return None

    return field_values(cls).map(build).filter(lambda v: v is not None)
