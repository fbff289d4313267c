"""Backends, registered by target name (installed as crystalc.backends).

A backend turns a verified Graph into artifacts on disk (`emit`) and, where a
real tool exists for them, builds or simulates those artifacts (`build`). New
targets are one module, one template folder (named in pyproject.toml, which
setuptools needs of data folders) and one entry in BACKENDS: the
command line's --target choices, its help and its per-target options follow it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from crystalc.errors import CrystalError

if TYPE_CHECKING:  # the CLI reads BACKENDS for --help: importing this package stays light
    from crystalc.ir.graph import Graph


class Backend(Protocol):
    name: str

    # Each backend's options beyond these are keyword-only parameters of its own (C's build takes cflags,
    # Verilog's emit lanes, ...): a name it does not take is a TypeError, never silently ignored.
    def emit(self, graph: Graph, out_dir: Path, **options: Any) -> list[Path]:
        """Write the artifacts for `graph` into the (empty, existing) folder `out_dir`."""
        ...

    def build(self, out_dir: Path, **options: Any) -> Path:
        """Build what `emit` wrote with the target's real tool; return the main product."""
        ...


@dataclass(frozen=True)
class Target:
    """What the command line knows of a target without importing it (`--help` stays fast)."""

    module: str  # crystalc.backends.<module> defines BACKEND
    summary: str  # what `compile` makes of it, for --target's help
    options: tuple[str, ...] = ()  # compile's options that only this target takes (click parameter names)


BACKENDS: dict[str, Target] = {
    "c": Target("c", "a C99 program; --build runs make and cc", ("cflags",)),
    "verilog": Target("verilog", "a Q16.16 fixed-point core; --build compiles its simulation with Icarus",
                      ("lanes",)),
    "spice": Target("spice", "each block's neuron field as an ngspice circuit; --build solves it once",
                    ("frozen_only",)),
    "cuda": Target("cuda", "the C program with its forward pass on a GPU; --build runs make, nvcc and cc"),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise CrystalError(f"unknown target {name!r}; known: {', '.join(sorted(BACKENDS))}")
    module = importlib.import_module(f"crystalc.backends.{BACKENDS[name].module}")
    return module.BACKEND
