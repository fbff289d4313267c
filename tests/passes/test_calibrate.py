"""Calibrated rounding: same scales as nearest rounding, smaller layer output error on the calibration inputs."""

from __future__ import annotations

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.format.crystal import decode_crystal, encode_crystal
from crystalc.ir import interpret
from crystalc.passes.calibrate import calibration_windows, input_grams, round_calibrated
from crystalc.passes.quantize import parse_granularity, quantize, quantize_array
from tests.conftest import random_graph

CHARS = "\n !',.:;?abcdefghijklmnopqrstuvwxyz"
TEXT = "first citizen: before we proceed any further, hear me speak.\nall: speak, speak.\n" * 3


def _graph(shape: str = "d40_h5", seed: int = 1):
    from tests.conftest import FIXTURE_SHAPES

    v = FIXTURE_SHAPES[shape]["vocab_size"]
    return random_graph(shape, seed=seed, tokenizer={"kind": "char", "chars": CHARS[:v]})


def _correlated_inputs(n: int, d: int, seed: int) -> np.ndarray:
    """Inputs whose features are correlated (as a layer's are), so that errors can be traded."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d))).astype(np.float32)


def _output_error(x: np.ndarray, w: np.ndarray, t) -> float:
    return float(np.sum((x.astype(np.float64) @ (w.astype(np.float64) - t.values().astype(np.float64)).T) ** 2))


@pytest.mark.parametrize("bits", (8, 16))
@pytest.mark.parametrize("gran", ("row", "group:5", "tensor"))
def test_calibrated_rounding_lowers_the_output_error_with_the_same_parameters(gran: str, bits: int) -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    x = _correlated_inputs(500, 40, seed=4)
    near = quantize_array("w", w, bits, parse_granularity(gran))
    codes = round_calibrated(w, near.quant, x.astype(np.float64).T @ x.astype(np.float64), 127 if bits == 8 else 32767)
    cal = type(near)("w", codes.astype(near.data.dtype), near.quant)
    qmax = 127 if bits == 8 else 32767
    assert np.abs(cal.data.astype(np.int32)).max() <= qmax
    assert not np.array_equal(cal.data, near.data)
    # measured: about 0.3-0.5 of nearest rounding's output error
    assert _output_error(x, w, cal) < 0.7 * _output_error(x, w, near)


def _obs_reference(w: np.ndarray, scale: np.ndarray, offset: np.ndarray, gram: np.ndarray, qmax: int) -> np.ndarray:
    """The same greedy algorithm in its optimal-brain-surgeon form (Frantar et al. 2022, eq. 2-3):
    quantize column j, spread its error over the later columns through the inverse Hessian, then
    remove j from that inverse by a Schur complement. The pass takes the Cholesky shortcut instead."""
    cols = w.shape[1]
    g = gram + 0.01 * np.mean(np.diag(gram)) * np.eye(cols)
    hinv = np.linalg.inv(g)
    work = w.astype(np.float64).copy()
    codes = np.zeros_like(work)
    for j in range(cols):
        codes[:, j] = np.clip(np.round((work[:, j] - offset[:, j]) / scale[:, j]), -qmax, qmax)
        err = (work[:, j] - (codes[:, j] * scale[:, j] + offset[:, j])) / hinv[j, j]
        work[:, j + 1:] -= np.outer(err, hinv[j, j + 1:])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


@pytest.mark.parametrize("gran", ("row", "group:5", "tensor"))
def test_codes_equal_the_optimal_brain_surgeon_form(gran: str) -> None:
    rng = np.random.default_rng(8)
    w = rng.standard_normal((16, 20)).astype(np.float32)
    x = _correlated_inputs(300, 20, seed=9).astype(np.float64)
    near = quantize_array("w", w, 8, parse_granularity(gran))
    scale, offset = (a.astype(np.float64) for a in near.quant.expanded(w.shape))
    want = _obs_reference(w, scale, offset, x.T @ x, 127)
    got = round_calibrated(w, near.quant, x.T @ x, 127)
    assert np.array_equal(got, want)
    assert np.count_nonzero(got != near.data) > 10  # the feedback moved codes: the comparison means something


def test_uncorrelated_inputs_give_nearest_rounding() -> None:
    # G proportional to the identity: no column can absorb another's error, so the codes are the nearest ones
    rng = np.random.default_rng(5)
    w = rng.standard_normal((9, 16)).astype(np.float32)
    for gran in ("row", "group:4"):
        near = quantize_array("w", w, 8, parse_granularity(gran))
        codes = round_calibrated(w, near.quant, 3.0 * np.eye(16), 127)
        assert np.array_equal(codes.astype(np.int8), near.data), gran


def test_dead_inputs_and_zero_rows_are_handled() -> None:
    w = np.random.default_rng(6).standard_normal((4, 6)).astype(np.float32)
    w[2] = 0.0  # scale 0: codes 0
    x = _correlated_inputs(50, 6, seed=7)
    x[:, 3] = 0.0  # an input that never fires
    near = quantize_array("w", w, 8, parse_granularity("row"))
    codes = round_calibrated(w, near.quant, x.astype(np.float64).T @ x, 127)
    assert np.all(np.isfinite(codes)) and not np.any(codes[2])


@pytest.mark.parametrize("shape", ("d40_h5", "three_blocks_n0_n1", "tied_unnormalised"))
def test_input_grams_are_those_of_the_interpreters_linear_layers(shape: str, monkeypatch) -> None:
    g = _graph(shape)
    windows = calibration_windows(g, TEXT, 64)
    seen: dict[str, np.ndarray] = {}
    linear = interpret.linear

    def rec_linear(x, weight, bias, tap=None):  # every projection, fc1, fc2 and the head go through linear
        if weight.name != "token_embed.weight":  # a tied head keeps nearest rounding
            x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            seen[weight.name] = seen.get(weight.name, 0) + x64.T @ x64
        return linear(x, weight, bias, tap)

    monkeypatch.setattr(interpret, "linear", rec_linear)
    for ids in windows:
        interpret.forward(g, list(ids))
    monkeypatch.undo()
    grams = input_grams(g, windows)
    assert grams.keys() == seen.keys()
    n_linear = 6 * g.config.n_blocks + (0 if g.config.tie_head else 1)
    assert len(grams) == n_linear
    for name, gram in grams.items():
        np.testing.assert_allclose(gram, seen[name], rtol=1e-5, atol=1e-6 * np.abs(seen[name]).max(), err_msg=name)


@pytest.mark.parametrize("mode,gran", [("int8", "row"), ("mixed8", "group:4"), ("int16", "tensor")])
def test_calibrated_quantize_pass(mode: str, gran: str) -> None:
    g = _graph("three_blocks_n0_n1", seed=2)
    windows = calibration_windows(g, TEXT, 200)
    near, cal = quantize(g, mode, gran), quantize(g, mode, gran, calibration=windows)
    grams = input_grams(g, windows)
    floats = {t.name: t for t in g.tensors()}
    changed = 0
    near_err: list[float] = []
    cal_err: list[float] = []
    for a, b in zip(near.tensors(), cal.tensors(), strict=True):
        if b.quant is None:
            assert b.data.tobytes() == a.data.tobytes(), b.name
            continue
        # same scales and offsets, whatever the rounding
        assert a.quant.scale.tobytes() == b.quant.scale.tobytes(), b.name
        assert a.quant.offset.tobytes() == b.quant.offset.tobytes(), b.name
        if b.name not in grams:  # embeddings, the field, 1-D tensors: nearest rounding
            assert np.array_equal(a.data, b.data), b.name
            continue
        changed += not np.array_equal(a.data, b.data)
        # the quantity minimised, tr((W - deq) G (W - deq)^T): greedy column by column, so not
        # lower for every small matrix, but lower summed over the layers
        w = floats[b.name].values().astype(np.float64)
        for total, t in ((near_err, a), (cal_err, b)):
            d = w - t.values().astype(np.float64)
            total.append(float(np.trace(d @ grams[b.name] @ d.T)) / float(np.trace(grams[b.name])))
    assert changed >= 3
    assert sum(cal_err) < 0.75 * sum(near_err), (sum(cal_err), sum(near_err))  # measured 0.40-0.54
    assert cal.meta["quantize"]["rounding"] == f"calibrated on {windows.size} tokens"
    back = decode_crystal(encode_crystal(cal))
    assert interpret.forward(back, [1, 2, 3]).tobytes() == interpret.forward(cal, [1, 2, 3]).tobytes()


def test_calibration_text_must_fill_a_window() -> None:
    g = _graph("d40_h5")
    with pytest.raises(CrystalError, match="the calibration text holds 2 tokens this model knows, fewer than one"):
        calibration_windows(g, "ab", 100)
    # the cap counts tokens before a pruned vocabulary's missing ones are skipped; the message says so (an
    # audit: "holds 8 known tokens" of a text with a thousand)
    with pytest.raises(CrystalError, match=r"the first 3 tokens of the calibration text \(--calibrate-tokens\) "
                                           "hold 3 tokens"):
        calibration_windows(g, TEXT, 3)
    with pytest.raises(CrystalError, match="tokenizer"):
        calibration_windows(random_graph("d40_h5", seed=1), TEXT, 100)
