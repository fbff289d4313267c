"""Running passes in order, verifying the graph after each (as MLIR does)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from crystalc.ir.graph import Graph


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]


def run_pipeline(graph: Graph, passes: Sequence[Pass]) -> Graph:
    graph.verify()
    for p in passes:
        graph = p.run(graph).verify()
    return graph
