"""The quality report: its batched forward against the interpreter, its metrics, its command."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.evaluate import (
    CorpusNotes,
    _split,
    corpus_to_ids,
    evaluate,
    forward_windows,
    markdown,
    sensitivity,
    sensitivity_markdown,
)
from crystalc.ir.interpret import forward
from crystalc.ir.tensor import Tensor
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, save_pt

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")


def char_graph(shape: str = "d40_h5", seed: int = 0):
    cfg = dict(FIXTURE_SHAPES[shape], vocab_size=len(CHARS))
    return random_graph(cfg, seed=seed, tokenizer={"kind": "char", "chars": CHARS})


@pytest.mark.parametrize("quant", (None, ("int8", "group:3")))
def test_forward_windows_matches_the_interpreter(fixture_graph, quant) -> None:
    g = quantize(fixture_graph, *quant) if quant else fixture_graph
    rng = np.random.default_rng(0)
    windows = rng.integers(0, g.config.vocab_size, size=(5, g.config.n_ctx))
    got = forward_windows(g, windows)
    want = np.stack([forward(g, w.tolist()) for w in windows])
    # same op functions and weights; only BLAS blocking of the flattened batch may reorder sums
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_split_covers_every_prediction_once() -> None:
    ids = np.arange(23)
    groups = _split(ids, 5)
    xs = np.concatenate([x.reshape(-1) for x, _ in groups])
    ys = np.concatenate([y.reshape(-1) for _, y in groups])
    np.testing.assert_array_equal(xs, np.arange(22))
    np.testing.assert_array_equal(ys, np.arange(1, 23))
    assert [x.shape for x, _ in groups] == [(4, 5), (1, 2)]


def test_report_metrics() -> None:
    g = char_graph()
    rep = evaluate(g, TEXT, modes=("int16", "int8"), granularities=("row", "tensor"), max_tokens=100)
    assert [(r.mode, r.granularity) for r in rep.rows] == [
        ("float32", "-"), ("int16", "row"), ("int16", "tensor"), ("int8", "row"), ("int8", "tensor")]
    base = rep.rows[0]
    assert rep.corpus.n_tokens == 100
    assert base.top1_agreement == 1.0 and base.max_logit_error == 0.0
    # the float32 cross-entropy, recomputed here position by position with the interpreter
    ids = corpus_to_ids(g, TEXT, 100)[0]
    t = g.config.n_ctx
    nll = []
    for start in range(0, 100, t):
        x = ids[start:min(start + t, 100)]
        logits = forward(g, x.tolist()).astype(np.float64)
        y = ids[start + 1:start + 1 + len(x)]
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll.extend(lse - logits[np.arange(len(x)), y])
    assert math.isclose(base.cross_entropy, float(np.mean(nll)), rel_tol=1e-5)
    assert math.isclose(base.perplexity, math.exp(base.cross_entropy))
    int16_row = rep.rows[1]
    assert int16_row.max_logit_error < 1e-2 and abs(int16_row.perplexity / base.perplexity - 1) < 1e-3
    assert int16_row.nbytes < base.nbytes
    table = markdown(rep)
    assert table.splitlines()[0].startswith("| mode | granularity |")
    assert "| int8 | tensor |" in table and "100 predicted tokens" in table


def test_sensitivity_swaps_each_quantized_tensor_alone() -> None:
    g = char_graph()
    rep = sensitivity(g, TEXT, "int8", "tensor", max_tokens=100)
    names = [r.name for r in rep.rows]
    assert names[-1] == "(all)"
    assert sorted(names[:-1]) == sorted(t.name for t in g.tensors() if t.dtype != "bool")
    kls = [r.kl_divergence for r in rep.rows[:-1]]
    assert kls == sorted(kls, reverse=True) and min(kls) >= 0
    whole = evaluate(g, TEXT, modes=("int8",), granularities=("tensor",), max_tokens=100)
    assert math.isclose(rep.base_cross_entropy, whole.rows[0].cross_entropy, rel_tol=1e-6)
    assert math.isclose(rep.rows[-1].cross_entropy, whole.rows[1].cross_entropy, rel_tol=1e-6)
    assert rep.rows[-1].top1_agreement == whole.rows[1].top1_agreement
    mixed = {r.name for r in sensitivity(g, TEXT, "mixed8", "row", max_tokens=100).rows}
    assert "token_embed.weight" not in mixed and "pos_embed.weight" not in mixed and "head.weight" in mixed
    table = sensitivity_markdown(rep)
    assert table.startswith("int8 tensor, one tensor at a time") and "| (all) | - | - |" in table
    g0 = random_graph(dict(FIXTURE_SHAPES["three_blocks_n0_n1"], vocab_size=len(CHARS)), seed=0,
                      tokenizer={"kind": "char", "chars": CHARS})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no statistics of an empty tensor
        names0 = [r.name for r in sensitivity(g0, TEXT, "int8", "row", max_tokens=30).rows]
    assert "blocks.0.field.positions" not in names0 and "blocks.1.field.positions" in names0


def test_sensitivity_names_the_tensor_an_outlier_stretches() -> None:
    """One weight 40 standard deviations out makes a per-tensor int8 step about 10x
    coarser for its whole tensor: the report must put that tensor first under `tensor`,
    and per-row scales confine the damage to the outlier's row (KL falls 10x and more:
    the error variance of the other rows falls about 100x)."""
    g = char_graph()
    name = "blocks.0.ffn.fc1.weight"

    def with_outlier(t: Tensor) -> Tensor:
        if t.name != name:
            return t
        x = t.values().copy()
        x[3, 5] = x.mean() + 40 * x.std()
        return Tensor(name, x)

    g = g.map_tensors(with_outlier).verify()
    per_tensor = sensitivity(g, TEXT, "int8", "tensor", max_tokens=200)
    first = per_tensor.rows[0]
    assert first.name == name and first.peak_over_std > 30
    assert max(r.peak_over_std for r in per_tensor.rows[1:-1]) < 10
    per_row = {r.name: r for r in sensitivity(g, TEXT, "int8", "row", max_tokens=200).rows}
    assert per_row[name].kl_divergence < first.kl_divergence / 10


def test_pruned_model_drops_unknown_tokens() -> None:
    p = prune_vocab(char_graph(), "First Citizen", [])
    rep = evaluate(p, TEXT, modes=(), granularities=("row",), max_tokens=None)
    notes = rep.corpus
    assert notes.dropped_tokens > 0 and notes.n_tokens + 1 + notes.dropped_tokens == len(TEXT)
    assert f"{notes.dropped_tokens:,} corpus tokens outside the pruned vocabulary left out" in markdown(rep)
    # and the per-tensor report says so too
    per_tensor = sensitivity(p, TEXT, "int8", "row", max_tokens=None)
    assert per_tensor.corpus == notes and "outside the pruned vocabulary" in sensitivity_markdown(per_tensor)


def test_characters_the_tokenizer_lacks_are_counted() -> None:
    # skipped, as pruned tokens are left out, and said so under both reports; within --max-tokens' reach only
    g = char_graph()
    text = "ROMEO: 0\u00e9 hi \u00f1" + TEXT
    rep = evaluate(g, text, modes=("int8",), granularities=("row",), max_tokens=None)
    assert rep.corpus.unknown_chars == sum(ch not in g.tokenizer["chars"] for ch in text) >= 2
    assert f"{rep.corpus.unknown_chars:,} corpus characters the tokenizer lacks skipped" in markdown(rep)
    assert sensitivity(g, text, "int8", "row", max_tokens=None).corpus.unknown_chars == rep.corpus.unknown_chars
    ids, _, unknown = corpus_to_ids(g, text, 3)  # four tokens read: the unknown ones after them are not
    assert len(ids) == 4 and unknown == sum(ch not in g.tokenizer["chars"] for ch in text[:len("ROMEO")])


def test_a_mode_or_granularity_asked_twice_is_reported_once() -> None:
    rep = evaluate(char_graph(), TEXT, modes=("int8", "int8"), granularities=("group:4", "group:04", "row"),
                   max_tokens=50)
    assert [(r.mode, r.granularity) for r in rep.rows] == [("float32", "-"), ("int8", "group:4"), ("int8", "row")]


def test_errors() -> None:
    with pytest.raises(CrystalError, match="no tokenizer"):
        evaluate(random_graph("all_on"), TEXT)
    with pytest.raises(CrystalError, match="fewer than 2 tokens"):
        evaluate(char_graph(), "\u00e9")
    with pytest.raises(CrystalError, match="granularity"):
        evaluate(char_graph(), TEXT, granularities=("group:",))


def _crystalc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalc.cli", *args], capture_output=True, text=True, timeout=120)


def test_eval_command(tmp_path: Path) -> None:
    model = save_pt(char_graph(), tmp_path / "m.pt")
    corpus = tmp_path / "held.txt"
    corpus.write_text(TEXT * 3)
    r = _crystalc("eval", str(model), "--corpus", str(corpus), "--modes", "mixed8,int8",
                  "--granularities", "row,group:8", "--max-tokens", "200")
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ")]
    assert len(rows) == 1 + 1 + 4  # header, float32, 2 modes x 2 granularities
    assert "eval [4/5] int8 group:8" in r.stderr and "eval [5/5] done" in r.stderr
    r = _crystalc("eval", str(model), "--corpus", str(corpus), "--modes", "int8", "--granularities",
                  "tensor,row", "--max-tokens", "100", "--per-tensor")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("one tensor at a time") == 2 and r.stdout.count("| (all) |") == 2
    for bad in (("--modes", "int4"), ("--granularities", "group:0"), ("--per-tensor", "--modes", "int8,int4"),
                ("--modes", ""), ("--granularities", ","), ("--calibrate", str(corpus))):
        r = _crystalc("eval", str(model), "--corpus", str(corpus), *bad)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_perplexity_past_float64_is_inf_not_a_crash() -> None:
    """Finite logits whose cross-entropy passes 709 nats: the perplexity is inf, the table still prints."""
    from crystalc.evaluate import sensitivity, sensitivity_markdown

    g = char_graph()
    b = g.head.bias.data.copy()
    b[0] = 1000.0  # every position's prediction is token 0, almost surely wrong
    g = g.map_tensors(lambda t: Tensor(t.name, b) if t.name == "head.bias" else t)
    rep = evaluate(g, TEXT, modes=["int8"], granularities=["row"])
    assert rep.rows[0].perplexity == float("inf") and "| inf |" in markdown(rep)
    assert "float32 perplexity inf" in sensitivity_markdown(sensitivity(g, TEXT, "int8", "row"))


def test_a_model_whose_float32_logits_overflow_is_a_crystal_error() -> None:
    """A finite weight near float32's limit makes every logit inf/nan: no reference, so no table of nans."""
    from crystalc.evaluate import sensitivity

    g = char_graph()
    w = g.head.weight.data.copy()
    w[0, 0] = 3e38
    g = g.map_tensors(lambda t: Tensor(t.name, w) if t.name == "head.weight" else t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing on stderr but our one line
        with pytest.raises(CrystalError, match="float32 logits are not finite"):
            evaluate(g, TEXT, modes=["int8"], granularities=["tensor"])
        with pytest.raises(CrystalError, match="float32 logits are not finite"):
            sensitivity(g, TEXT, "int8", "tensor")


def test_a_quantized_input_is_said_to_be_the_reference() -> None:
    # an audit: a .crystal input of codes was reported as "float32" with nothing saying it was quantized
    g = char_graph()
    plain = markdown(evaluate(g, TEXT, modes=["int8"], granularities=["row"], max_tokens=40))
    assert "the input was quantized" not in plain
    q = quantize(g, "int8", "row")
    n = sum(t.quant is not None for t in q.tensors())
    said = markdown(evaluate(q, TEXT, modes=["int8"], granularities=["row"], max_tokens=40))
    assert f"the input was quantized ({n:,} tensors)" in said
    assert "the input was quantized" in sensitivity_markdown(sensitivity(q, TEXT, "int8", "row", max_tokens=40))
    assert "\n1 predicted token.\n" in markdown(evaluate(g, TEXT[:2], modes=["int8"], granularities=["row"]))
    # its float32 row is sized as float32: the input's quantize record, which a .crystal of it would carry, is
    # not (an audit: 160 bytes more than the same float32 model's file)
    float32_q, float32_g = (evaluate(m, TEXT, modes=[], granularities=["row"], max_tokens=40).rows[0] for m in (q, g))
    assert float32_q.nbytes == float32_g.nbytes


def test_too_few_tokens_within_max_tokens_says_so() -> None:
    # an audit: a pruned model's first 2 tokens were both pruned, and the error blamed the corpus
    p = prune_vocab(char_graph(), "F", [])  # "F" alone: "First" loses its "i" onwards
    with pytest.raises(CrystalError, match=r"fewer than 2 tokens the model knows \(of the first 2 tokens: "
                                           r"--max-tokens\)"):
        evaluate(p, TEXT, modes=["int8"], granularities=["row"], max_tokens=1)
    assert "1 corpus token outside" in CorpusNotes(n_tokens=3, dropped_tokens=1).markdown()
