"""Acceptance of the quantize and prune-vocab passes on models that mean something.

Quantization: a small char model trained here on the start of tinyshakespeare
(a plain Adam loop, about 10 s on one core) is scored on held-out text from the
end of the corpus, through crystalc.evaluate (the numpy interpreter).

Pruning: a BPE tokenizer trained with `tokenizers` to 4,000 tokens, a random model
over it, pruned against the first 100,000 characters (most of Coriolanus).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest

from crystalc.evaluate import EvalRow, evaluate
from crystalc.frontend import load_model
from crystalc.ir import interpret
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from crystalc.tokenizer import Tokenizer, char_tokenizer
from tests.conftest import CORPUS, REPO, random_graph, require_module

# under pytest-xdist the file's tests share one worker, which builds its module fixtures
# (models trained and scored) once
pytestmark = pytest.mark.xdist_group("test_quality_trained")

TRAIN_CHARS = 300_000
HELD_OUT_CHARS = 20_000


def _corpus() -> str:
    return CORPUS.read_text(encoding="utf-8")


def train_char_model(text: str, steps: int = 400, seed: int = 0) -> Graph:
    """A CrystalLM (D=64, T=32, 32 neurons) trained by plain Adam, returned through the .pt front end."""
    torch = require_module("torch")
    from crystalc.config import ModelConfig
    from crystalc.model import CrystalLM, save_checkpoint

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared; one core is enough for this size
    try:
        tok = char_tokenizer(text)
        ids = torch.tensor(Tokenizer(tok).encode(text[:TRAIN_CHARS]))
        cfg = ModelConfig.from_dict(dict(vocab_size=len(tok["chars"]), d_model=64, n_ctx=32, n_heads=4,
                                         n_neurons=32, ffn_hidden=128))
        model = CrystalLM(cfg)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(seed)
        t = cfg.n_ctx
        for _ in range(steps):
            start = torch.randint(0, ids.numel() - t - 1, (32,), generator=gen)
            x = torch.stack([ids[i:i + t] for i in start])
            y = torch.stack([ids[i + 1:i + t + 1] for i in start])
            loss = torch.nn.functional.cross_entropy(model(x).reshape(-1, cfg.vocab_size), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "char.pt"
            save_checkpoint(str(path), model, tok, meta={"steps": steps})
            return load_model(path)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def report() -> dict[tuple[str, str], EvalRow]:
    text = _corpus()
    graph = train_char_model(text)
    rep = evaluate(graph, text[-HELD_OUT_CHARS:], modes=("int8", "int16", "mixed8"),
                   granularities=("tensor", "row", "group:16"), max_tokens=4096)
    return {(r.mode, r.granularity): r for r in rep.rows}


def _ppl_change(rows: dict[tuple[str, str], EvalRow], key: tuple[str, str]) -> float:
    return rows[key].perplexity / rows[("float32", "-")].perplexity - 1


def test_the_model_learned_something(report) -> None:
    assert report[("float32", "-")].perplexity < 13  # uniform over 65 characters would be 65


@pytest.mark.parametrize("gran", ("tensor", "row", "group:16"))
def test_mixed8_stays_within_one_percent(report, gran: str) -> None:
    assert abs(_ppl_change(report, ("mixed8", gran))) < 0.01


def test_per_row_int8_of_everything(report) -> None:
    row, base = report[("int8", "row")], report[("float32", "-")]
    assert row.top1_agreement >= 0.99
    assert abs(_ppl_change(report, ("int8", "row"))) < 0.02
    # about a quarter: int8 codes are a quarter of float32, plus one scale per row of 64
    # (1/16 more; the file stores no offsets for row), the 1-D tensors, header and tokenizer
    assert row.nbytes / base.nbytes < 0.30


def test_per_tensor_int8_is_coarser_than_per_row(report) -> None:
    # The seeds saw per-tensor int8 (and even int16) wreck their model. On this honest
    # char model it does not: perplexity moves by well under 1% (see README, "Quantization
    # quality"). What does hold is the ordering: one min/max range per tensor errs more
    # than a scale per row, and int16 is all but exact whatever the granularity.
    assert report[("int8", "tensor")].max_logit_error > report[("int8", "row")].max_logit_error
    for gran in ("tensor", "row", "group:16"):
        assert report[("int16", gran)].top1_agreement >= 0.999
        assert report[("int16", gran)].max_logit_error < 0.01


def _bpe_tokenizer(text: str, vocab_size: int) -> dict:
    tk = require_module("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 10_000] for i in range(0, len(text), 10_000)], trainer)
    return {"kind": "hf-tokenizers", "json": tok.to_str()}


def _file_size(graph: Graph, tmp: Path, name: str) -> int | None:
    if importlib.util.find_spec("crystalc.format.crystal") is None:
        return None
    from crystalc.format.crystal import write_crystal

    write_crystal(graph, tmp / name)
    return (tmp / name).stat().st_size


@pytest.mark.parametrize("quant", (None, ("mixed8", "row")))
def test_bpe_model_pruned_against_one_play(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant) -> None:
    text = _corpus()
    tok = _bpe_tokenizer(text, 4000)
    v = Tokenizer(tok).vocab_size
    d = 32
    g = random_graph(dict(vocab_size=v, d_model=d, n_ctx=16, n_heads=4, n_neurons=8, ffn_hidden=64), seed=3,
                     tokenizer=tok)
    if quant:
        g = quantize(g, *quant)
    play = text[:100_000]
    p = prune_vocab(g, play, [])
    kept = p.config.vocab_size
    assert 0.3 * v < kept < 0.8 * v, kept  # far fewer tokens than the tokenizer knows

    # bytes shrink by exactly the removed rows of token_embed, head.weight and head.bias
    if quant is None:
        per_row = file_per_row = 4 * d + 4 * d + 4  # embedding row, head row, head bias
    else:  # float32 embedding row; int8 head row with its scale (no offset: symmetric); int8 bias code
        per_row = file_per_row = 4 * d + (d + 4) + 1
    assert g.nbytes - p.nbytes == (v - kept) * per_row
    before, after = _file_size(g, tmp_path, "full.crystal"), _file_size(p, tmp_path, "pruned.crystal")
    if before is not None:
        # the file too, give or take the id map (4 bytes a kept row), metadata and alignment
        saved = before - after
        assert abs(saved - (v - kept) * file_per_row) <= 4 * kept + 4096, (saved, (v - kept) * file_per_row)

    ids = Tokenizer(tok).encode(play[5_000:6_000])[:16]
    full = forward(g, ids)
    pruned = forward(p, p.to_current_ids(ids))
    np.testing.assert_allclose(pruned, full[:, p.vocab_map], rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(interpret, "head", lambda op, weight, h, tap=None: h)
    np.testing.assert_array_equal(forward(p, p.to_current_ids(ids)), forward(g, ids))


EXAMPLE_MODEL = REPO / "examples" / "shakespeare" / "model.pt"


@pytest.fixture(scope="module")
def example_report() -> dict[tuple[str, str], EvalRow]:
    """The bundled model on the tail its training held out (the README's table, 8,192 tokens)."""
    if not EXAMPLE_MODEL.is_file():
        pytest.skip("examples/shakespeare/model.pt is not here")
    text = _corpus()
    held_out = text[len(text) - int(len(text) * 0.1):]
    rep = evaluate(load_model(EXAMPLE_MODEL), held_out, modes=("int8", "mixed8"),
                   granularities=("tensor", "row", "group:16"), max_tokens=8192)
    return {(r.mode, r.granularity): r for r in rep.rows}


def test_example_model_quantization(example_report) -> None:
    rows = example_report
    for gran in ("tensor", "row", "group:16"):
        assert abs(_ppl_change(rows, ("mixed8", gran))) < 0.01
    assert abs(_ppl_change(rows, ("int8", "row"))) < 0.02
    # measured 0.26: row sections store their scales only (no offsets)
    assert rows[("int8", "row")].nbytes / rows[("float32", "-")].nbytes < 0.30
    # Measured, and short of the 99%: per-row int8 of everything agrees with float32
    # on 98.7% of next-token argmaxes (perplexity moves by under 0.1%: the flips are
    # near-ties); finer groups come to about 99.0-99.1%, within the metric's own noise
    # (one standard error over 8,192 positions is 0.11%). The README's "Quantization
    # quality" says so. What holds firmly is the ordering of the logit errors.
    assert rows[("int8", "row")].top1_agreement >= 0.98
    assert (rows[("int8", "tensor")].max_logit_error > rows[("int8", "row")].max_logit_error
            > rows[("int8", "group:16")].max_logit_error)


def test_example_model_calibrated_per_row_int8() -> None:
    """Per-row int8 of everything with calibrated rounding (crystalc.passes.calibrate) meets the
    issue's 99% top-1 at the same size: the codes of the linear layers are chosen on the first
    16,384 characters of the training text, the score is taken on the held-out tail as above."""
    if not EXAMPLE_MODEL.is_file():
        pytest.skip("examples/shakespeare/model.pt is not here")
    from crystalc.evaluate import _logits, _nll, _split, corpus_to_ids
    from crystalc.passes.calibrate import calibration_windows

    text = _corpus()
    cut = len(text) - int(len(text) * 0.1)
    g = load_model(EXAMPLE_MODEL)
    ids = corpus_to_ids(g, text[cut:], 8192)[0]
    groups = _split(ids, g.config.n_ctx)
    targets = np.concatenate([y.reshape(-1) for _, y in groups])
    ref = _logits(g, groups)
    scores = {}
    for name, cal in (("nearest", None), ("calibrated", calibration_windows(g, text[:cut], 16384))):
        logits = _logits(quantize(g, "int8", "row", calibration=cal), groups)
        ppl = float(np.exp(np.mean(_nll(logits, targets)) - np.mean(_nll(ref, targets))))
        scores[name] = (float(np.mean(logits.argmax(1) == ref.argmax(1))), ppl)
    assert scores["nearest"][0] < 0.99  # measured 98.73%
    assert scores["calibrated"][0] >= 0.99  # measured 99.07% (104 -> 76 flipped argmaxes of 8,192)
    assert abs(scores["calibrated"][1] - 1) < 0.002  # perplexity: measured +0.06%
