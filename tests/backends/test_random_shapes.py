"""Every backend on random small shapes (a fixed seed): the corners the named fixtures miss.

D from 1, as many heads as D, blocks without neurons, a one-token window, a one-token
vocabulary, each flag on and off. Tolerances as in each backend's own tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from crystalc.backends import fixedpoint as fp
from crystalc.backends import spice
from crystalc.backends.verilog import BACKEND as VERILOG
from crystalc.backends.verilog import cycles_counted
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward
from crystalc.passes.quantize import quantize
from tests.backends.test_cuda import cpu_program, parsed, run_logits
from tests.backends.test_fixedpoint import TOL as FIXED_TOL
from tests.backends.test_verilog import simulate
from tests.conftest import random_graph, require_tool

N_SHAPES = 11  # the smallest model there is, then ten drawn


def random_shape(rng: np.random.Generator) -> dict:
    heads = int(rng.integers(1, 4))
    d = heads * int(rng.integers(1, 6))
    blocks = int(rng.integers(1, 4))
    return dict(vocab_size=int(rng.integers(1, 20)), d_model=d, n_ctx=int(rng.integers(1, 7)), n_heads=heads,
                n_blocks=blocks, n_neurons=[int(n) for n in rng.integers(0, 5, blocks)],
                ffn_hidden=int(rng.integers(1, 2 * d + 2)), field_norm=bool(rng.integers(2)),
                final_norm=bool(rng.integers(2)), tie_head=bool(rng.integers(2)))


def cases() -> list[tuple[dict, list[int]]]:
    rng = np.random.default_rng(2026)
    out = [(dict(vocab_size=1, d_model=1, n_ctx=1, n_heads=1, n_blocks=1, n_neurons=1, ffn_hidden=1), [0])]
    for _ in range(N_SHAPES - 1):
        shape = random_shape(rng)
        out.append((shape, rng.integers(0, shape["vocab_size"], shape["n_ctx"]).tolist()))
    return out


CASES = cases()


def graph(i: int) -> Graph:
    return random_graph(CASES[i][0], seed=100 + i)


@pytest.mark.parametrize("i", range(N_SHAPES))
def test_fixed_point_emulator(i):
    g, ids = graph(i), CASES[i][1]
    ref = forward(g, ids)[-1]
    got = fp.to_float(fp.emulate(fp.lower(g), ids))
    assert np.abs(got - ref).max() <= FIXED_TOL * max(1.0, float(np.abs(ref).max()))


@pytest.mark.tool
@pytest.mark.parametrize("i", range(N_SHAPES))
def test_verilog_simulation(i, tmp_path: Path):
    require_tool("make", "iverilog", "vvp")
    g, ids = graph(i), CASES[i][1]
    lanes = 1 + i % 5  # 1 to 5 lanes: groups of rows, neurons and components short or longer than the layer
    quant = [None, ("int8", "row"), ("int16", "tensor"), ("mixed8", "group:2")][i % 4]  # the lanes read codes
    g = g if quant is None else quantize(g, *quant)
    VERILOG.emit(g, tmp_path, lanes=lanes)
    VERILOG.build(tmp_path)
    got, cycles = simulate(tmp_path, ids)
    assert got.tolist() == fp.emulate(fp.lower(g), ids).tolist()
    assert cycles == cycles_counted(fp.lower(g), lanes, len(ids))


@pytest.mark.tool
@pytest.mark.parametrize("i", range(N_SHAPES))
def test_spice_fields(i, tmp_path: Path):
    require_tool("ngspice")
    g, ids = graph(i), CASES[i][1]
    if not any(g.config.n_neurons):  # nothing for the SPICE target: one line says so
        with pytest.raises(CrystalError, match="no block has neurons"):
            spice.BACKEND.emit(g, tmp_path)
        return
    spice.BACKEND.emit(g, tmp_path)
    assert np.abs(spice.forward(g, tmp_path, ids) - forward(g, ids)).max() <= 1e-4


@pytest.mark.tool
@pytest.mark.parametrize("i", range(N_SHAPES))
def test_cuda_kernels_on_cpu(i, tmp_path: Path):
    require_tool("cc")
    g, ids = graph(i), CASES[i][1]
    exe = cpu_program(g, tmp_path / "out", threads=32)
    _, got = parsed(run_logits(exe, ids))
    assert np.abs(got - forward(g, ids)[-1]).max() <= 1e-4
