"""Running passes in order, verifying the graph after each (as MLIR does), and the one order crystalc uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]


def run_pipeline(graph: Graph, passes: Sequence[Pass]) -> Graph:
    graph.verify()
    for p in passes:
        graph = p.run(graph)
        try:  # each pass verifies its own output; this names the pass should one not
            graph.verify()
        except CrystalError as e:
            raise CrystalError(f"the graph after {p.name} does not verify: {e}") from None
    return graph


def standard_passes(prune_text: str | None, keep_ids: Sequence[int], mode: str | None, granularity: str | None,
                    calibration: Callable[[Graph], np.ndarray | None] = lambda _g: None) -> list[Pass]:
    """prune_vocab (when there is a corpus or ids to keep), then quantize (when a mode is given): pruning first
    quantizes fewer rows, and a calibration text is read by the pruned graph it calibrates."""
    from crystalc.passes.prune_vocab import prune_vocab
    from crystalc.passes.quantize import quantize

    passes = []
    if prune_text is not None or keep_ids:
        passes.append(Pass("prune_vocab", lambda g: prune_vocab(g, prune_text, list(keep_ids))))
    if mode is not None:
        passes.append(Pass("quantize", lambda g: quantize(g, mode, "tensor" if granularity is None else granularity,
                                                          calibration=calibration(g))))
    return passes
