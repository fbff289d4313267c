"""The reference interpreter against the spec's vectors and against CrystalLM (torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crystalc.errors import CrystalError
from crystalc.frontend import load_model
from crystalc.ir.interpret import forward, generate
from crystalc.model import model_from_graph
from tests.conftest import FIXTURE_SHAPES, SPEC_VECTORS, random_graph

EXPECTED = json.loads((SPEC_VECTORS / "expected.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_spec_vectors(name: str) -> None:
    """Float32 against the float64 vectors: 1e-5 is float32 rounding through a few layers."""
    g = load_model(SPEC_VECTORS / f"{name}.pt")
    model = model_from_graph(g).eval()
    for case in EXPECTED[name]["cases"]:
        want = np.array(case["logits"], dtype=np.float64)
        got = forward(g, case["prompt_ids"])[-1]
        assert np.abs(got - want).max() < 1e-5
        with torch.no_grad():
            t = model(torch.tensor([case["prompt_ids"]]))[0, -1].numpy()
        assert np.abs(t - want).max() < 1e-5


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
@pytest.mark.parametrize("length", ["one", "full"])
def test_interpreter_matches_torch(shape: str, length: str) -> None:
    g = random_graph(shape, seed=3)
    s = 1 if length == "one" else g.config.n_ctx
    ids = np.random.default_rng(0).integers(0, g.config.vocab_size, s).tolist()
    with torch.no_grad():
        want = model_from_graph(g).eval()(torch.tensor([ids]))[0].numpy()
    got = forward(g, ids)
    assert got.shape == (s, g.config.vocab_size)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))


def test_generate_window_semantics() -> None:
    """Past the window with shift K, each step sees the context the spec describes."""
    g = random_graph("d40_h5", seed=4)
    t = g.config.n_ctx
    prompt = [1, 2, 3]
    for k in (1, 3, t):
        out = generate(g, prompt, 20, shift=k)
        ctx = list(prompt)
        for i, tok in enumerate(out):
            assert tok == int(np.argmax(forward(g, ctx)[-1])), (k, i)
            if len(ctx) == t:
                ctx = ctx[k:]
            ctx.append(tok)


def test_greedy_skips_nan_logits_as_the_programs_do() -> None:
    # found by an audit: np.argmax took the first NaN, where the C programs' greedy pick skips NaNs
    g = random_graph("all_on")
    nan_first = np.array([1.0, np.nan, 2.0, 2.0], dtype=np.float32)
    assert generate(g, [0], 2, logits_of=lambda ctx: nan_first) == [2, 2]


def test_forward_rejects_bad_sequences() -> None:
    g = random_graph("all_on")
    with pytest.raises(CrystalError):
        forward(g, [])
    with pytest.raises(CrystalError):
        forward(g, [0] * (g.config.n_ctx + 1))
    with pytest.raises(CrystalError):
        forward(g, [g.config.vocab_size])
    with pytest.raises(CrystalError):
        generate(g, [0], 3, shift=0)
    # found by an audit: converted to int64 silently (1.9 ran as 1, True as 1, "3" as 3; a scalar was a TypeError)
    for bad in ([1.9], [True, False], ["3"], 3, [[1, 2]]):
        with pytest.raises(CrystalError, match="token ids must be"):
            forward(g, bad)
