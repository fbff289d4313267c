"""Passes compose: prune_vocab then quantize, through the library and through the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crystalc.frontend import load_model
from crystalc.ir.interpret import forward
from crystalc.passes.calibrate import calibration_windows
from crystalc.passes.pipeline import Pass, run_pipeline
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool, save_pt

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
CORPUS = "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n"


def char_graph(shape: str = "d40_h5", seed: int = 0):
    cfg = dict(FIXTURE_SHAPES[shape], vocab_size=len(CHARS))
    return random_graph(cfg, seed=seed, tokenizer={"kind": "char", "chars": CHARS})


def _crystalc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalc.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_prune_then_quantize_equals_quantize_then_prune(shape: str) -> None:
    g = char_graph(shape, seed=8)
    a = run_pipeline(g, [Pass("prune_vocab", lambda x: prune_vocab(x, CORPUS, [])),
                         Pass("quantize", lambda x: quantize(x, "mixed8", "row"))])
    b = prune_vocab(quantize(g, "mixed8", "row"), CORPUS, [])
    # row scales are per row, so slicing rows commutes with quantizing them; the 1-D head
    # bias is one row whose scale follows the largest kept entry, so it differs within a step
    for ta, tb in zip(a.tensors(), b.tensors(), strict=True):
        if ta.name == "head.bias":
            step = max(float(ta.quant.scale[0]), float(tb.quant.scale[0]))
            assert np.abs(ta.values() - tb.values()).max() <= step
            continue
        np.testing.assert_array_equal(ta.data, tb.data)
        if ta.quant is not None:
            np.testing.assert_array_equal(ta.quant.scale, tb.quant.scale)
    ids = a.to_current_ids([CHARS.index(c) for c in "Romeo"])
    np.testing.assert_allclose(forward(a, ids), forward(b, ids), atol=float(b.head.bias.quant.scale[0]) + 1e-6)
    assert a.meta["quantize"]["mode"] == "mixed8" and a.meta["prune_vocab"]["kept"] == a.config.vocab_size


def test_quantize_and_prune_commands_write_what_the_passes_compute(tmp_path: Path) -> None:
    g = char_graph("three_blocks_n0_n1", seed=9)  # a block with no neurons: empty quantized tensors
    model = save_pt(g, tmp_path / "m.pt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    r = _crystalc("quantize", str(model), "--int8", "--granularity", "group:5", "-o", str(tmp_path / "q.crystal"))
    assert r.returncode == 0, r.stderr
    q = load_model(tmp_path / "q.crystal")
    want = quantize(load_model(model), "int8", "group:5")
    for ta, tb in zip(q.tensors(), want.tensors(), strict=True):
        np.testing.assert_array_equal(ta.values(), tb.values())
    # a .crystal input composes too: prune the quantized file
    r = _crystalc("prune-vocab", str(tmp_path / "q.crystal"), "--corpus", str(corpus), "--keep", "0",
                  "-o", str(tmp_path / "p.crystal"))
    assert r.returncode == 0, r.stderr
    kept = sorted({0} | {CHARS.index(c) for c in CORPUS})
    assert f"kept {len(kept)} of {len(CHARS)} tokens" in r.stdout
    p = load_model(tmp_path / "p.crystal")
    assert p.vocab_map.tolist() == kept
    np.testing.assert_array_equal(p.token_embed.weight.values(), q.token_embed.weight.values()[kept])
    # pruned again with a corpus holding tokens the first pruning removed: they are counted, not lost silently
    gone = next(c for c in CHARS if CHARS.index(c) not in kept and c.isalpha())
    (tmp_path / "more.txt").write_text(CORPUS + gone * 3)
    r = _crystalc("prune-vocab", str(tmp_path / "p.crystal"), "--corpus", str(tmp_path / "more.txt"),
                  "-o", str(tmp_path / "p2.crystal"))
    assert r.returncode == 0 and "(1 distinct corpus token already pruned away, not restored)" in r.stdout
    # --calibrate: the pass with calibration windows of that text
    r = _crystalc("quantize", str(model), "--int8", "--granularity", "row", "--calibrate", str(corpus),
                  "--calibrate-tokens", "500", "-o", str(tmp_path / "c.crystal"))
    assert r.returncode == 0, r.stderr
    c = load_model(tmp_path / "c.crystal")
    base = load_model(model)
    want = quantize(base, "int8", "row", calibration=calibration_windows(base, CORPUS, 500))
    for ta, tb in zip(c.tensors(), want.tensors(), strict=True):
        np.testing.assert_array_equal(ta.values(), tb.values())
    assert c.meta["quantize"]["rounding"].startswith("calibrated on")


@pytest.mark.parametrize("args", (
    ("quantize", "{m}", "--int8", "--granularity", "group:0", "-o", "{d}/x.crystal"),
    ("quantize", "{m}", "--int8", "--granularity", "columns", "-o", "{d}/x.crystal"),
    ("quantize", "{m}", "-o", "{d}/x.crystal"),
    ("quantize", "{m}", "--int8", "--mixed8", "-o", "{d}/x.crystal"),  # two modes: not "last one wins"
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--quantize", "int4"),
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--quantize", "int8", "--granularity", "group:x"),
    ("prune-vocab", "{m}", "-o", "{d}/x.crystal"),
    ("prune-vocab", "{m}", "--keep", "1,x", "-o", "{d}/x.crystal"),
    ("prune-vocab", "{m}", "--keep", "999", "-o", "{d}/x.crystal"),
    ("prune-vocab", "{m}", "--keep", " ", "-o", "{d}/x.crystal"),  # no ids: the unpruned model, once written
    ("prune-vocab", "{m}", "--keep", "1,,2", "-o", "{d}/x.crystal"),
    ("prune-vocab", "{m}", "--keep", "1_0", "-o", "{d}/x.crystal"),  # Python's int() took it as 10
    ("prune-vocab", "{m}", "--keep", "+3", "-o", "{d}/x.crystal"),
    ("prune-vocab", "{m}", "--keep", "\u0663", "-o", "{d}/x.crystal"),  # an Arabic-Indic 3
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--keep", ","),  # was ignored
    ("quantize", "{m}", "--int8", "--calibrate", "{d}/missing.txt", "-o", "{d}/x.crystal"),
    ("quantize", "{m}", "--int8", "--calibrate", "{d}/short.txt", "-o", "{d}/x.crystal"),
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--calibrate", "{d}/short.txt"),
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--granularity", "row"),  # was silently ignored
    ("quantize", "{m}", "--int8", "--granularity", "", "-o", "{d}/x.crystal"),  # was taken as tensor
    ("compile", "{m}", "--target", "c", "-o", "{d}/out", "--cflags", "-O0"),  # flags of --build, which is absent
    ("quantize", "{m}", "--int8", "--calibrate-tokens", "64", "-o", "{d}/x.crystal"),  # nothing to calibrate on
    ("quantize", "{m}", "--int8", "-o", "{m}"),  # would replace the checkpoint it reads
    ("compile", "{m}", "--target", "c", "-o", "{d}"),  # would replace the folder the checkpoint is in
    ("prune-vocab", "{m}", "--corpus", "{d}/short.txt", "-o", "{d}/short.txt"),
))
def test_bad_options_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...]) -> None:
    model = save_pt(char_graph("all_on"), tmp_path / "m.pt")
    (tmp_path / "short.txt").write_text("ab")  # fewer tokens than one window
    r = _crystalc(*(a.format(m=model, d=tmp_path) for a in args))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("crystalc: error:"), r.stderr
    assert not list(tmp_path.glob("x.crystal*")) and not (tmp_path / "out").exists()
    assert model.read_bytes()[:2] == b"PK" and (tmp_path / "short.txt").read_text() == "ab"  # inputs intact


@pytest.mark.parametrize(("planted", "args", "why"), [
    # a per-tensor span past float32's range: numpy's overflow warnings came before the one line
    ({"head.weight": [((0, 0), 3e38), ((0, 1), -3e38)]}, ("--int8",),
     "head.weight: its values span 6e+38, past float32's range, which one per-tensor scale and offset cannot"),
    # a LayerNorm gain overflowing the float32 model: calibrated codes were garbage, and the file was written
    ({"blocks.0.ln1.weight": [(..., 3e38)]}, ("--int8", "--granularity", "row", "--calibrate", "{c}"),
     "calibration: the inputs of blocks.0.attn.q_proj.weight are not finite"),
])
def test_a_model_overflowing_float32_is_refused_in_one_line(tmp_path: Path, planted, args, why) -> None:
    from crystalc.ir.tensor import Tensor

    def plant(t: Tensor) -> Tensor:
        if t.name not in planted:
            return t
        data = t.data.copy()
        for at, v in planted[t.name]:
            data[at] = v
        return Tensor(t.name, data)

    model = save_pt(char_graph("d40_h5", seed=3).map_tensors(plant), tmp_path / "m.pt")
    (tmp_path / "c.txt").write_text(CORPUS)
    r = _crystalc("quantize", str(model), *(a.format(c=tmp_path / "c.txt") for a in args), "-o",
                  str(tmp_path / "x.crystal"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and why in r.stderr, r.stderr
    assert not list(tmp_path.glob("x.crystal*"))


def test_compile_never_replaces_the_output_folder_holding_its_model(tmp_path: Path) -> None:
    """An earlier output folder (marked, so compile may replace it) that the model was since saved into."""
    out = tmp_path / "out"
    r = _crystalc("compile", str(save_pt(char_graph("all_on"), tmp_path / "m.pt")), "--target", "c", "-o", str(out))
    assert r.returncode == 0, r.stderr
    model = save_pt(char_graph("all_on"), out / "m.pt")
    r = _crystalc("compile", str(model), "--target", "c", "-o", str(out))
    assert r.returncode == 2 and "would replace" in r.stderr, r.stderr
    assert model.is_file()


def test_compile_composes_prune_and_quantize(tmp_path: Path) -> None:
    g = char_graph("d40_h5", seed=10)
    model = save_pt(g, tmp_path / "m.pt")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    require_tool("gcc", "make")
    out = tmp_path / "out"
    r = _crystalc("compile", str(model), "--target", "c", "--prune-vocab", str(corpus), "--quantize", "mixed8",
                  "--granularity", "row", "-o", str(out), "--build")
    assert r.returncode == 0, r.stderr
    # the program speaks original ids and computes what the interpreter computes on the same passes
    want_graph = quantize(prune_vocab(load_model(model), CORPUS, []), "mixed8", "row")
    prompt = [CHARS.index(c) for c in "Romeo"]
    run = subprocess.run([str(out / "model"), "--prompt-ids", ",".join(map(str, prompt)), "--logits"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = [ln.split() for ln in run.stdout.splitlines()]
    assert [int(a) for a, _ in lines] == want_graph.vocab_map.tolist()
    got = np.array([float(b) for _, b in lines], dtype=np.float32)
    want = forward(want_graph, want_graph.to_current_ids(prompt))[-1]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_the_pipeline_names_a_pass_whose_graph_does_not_verify() -> None:
    from crystalc.errors import CrystalError
    from crystalc.passes.pipeline import standard_passes

    g = char_graph(seed=2)
    broken = Pass("claim_a_final_norm", lambda x: x.replace(config=x.config.__class__(**{**x.config.to_dict(),
                                                                                        "final_norm": True})))
    with pytest.raises(CrystalError, match="the graph after claim_a_final_norm does not verify: "):
        run_pipeline(g, [broken])
    assert [p.name for p in standard_passes(CORPUS, [], "mixed8", "row")] == ["prune_vocab", "quantize"]
    assert [p.name for p in standard_passes(None, [3], None, None)] == ["prune_vocab"]
    assert standard_passes(None, [], None, None) == []
