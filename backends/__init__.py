"""Backends, registered by target name (installed as crystalc.backends).

A backend turns a verified Graph into artifacts on disk (`emit`) and, where a
real tool exists for them, builds or simulates those artifacts (`build`). New
targets are one module, one template folder and one line in BACKENDS.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crystalc.errors import CrystalError

if TYPE_CHECKING:  # the CLI reads BACKENDS for --help: importing this package stays light
    from crystalc.ir.graph import Graph


class Backend(Protocol):
    name: str

    def emit(self, graph: Graph, out_dir: Path, **options: Any) -> list[Path]:
        """Write the artifacts for `graph` into the (empty, existing) folder `out_dir`."""
        ...

    def build(self, out_dir: Path, **options: Any) -> Path:
        """Build what `emit` wrote with the target's real tool; return the main product."""
        ...


# target name -> module under crystalc.backends defining BACKEND
BACKENDS: dict[str, str] = {
    "c": "c",
    "verilog": "verilog",
    "spice": "spice",
    "cuda": "cuda",
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise CrystalError(f"unknown target {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module = importlib.import_module(f"crystalc.backends.{BACKENDS[name]}")
    return module.BACKEND
