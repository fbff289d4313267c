"""Artifact regression: generated code and files must not change silently.

For two fixed fixture models, every registered backend's output and the .crystal
file in every quantization mode live under tests/golden/ and are compared byte
for byte. `pytest --update-golden` rewrites them; commit the diff with the reason.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crystalc.backends import BACKENDS, get_backend
from crystalc.ir.graph import Graph
from tests.conftest import random_graph

GOLDEN = Path(__file__).parent
CHARS = " \n!',-.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

# name -> (fixture shape with the vocabulary of a char tokenizer, seed)
MODELS = {
    "odd_d40": ({"vocab_size": len(CHARS), "d_model": 40, "n_ctx": 9, "n_heads": 5, "n_blocks": 1,
                 "n_neurons": 7, "ffn_hidden": 80}, 11),
    "three_blocks": ({"vocab_size": len(CHARS), "d_model": 12, "n_ctx": 7, "n_heads": 3, "n_blocks": 3,
                      "n_neurons": [0, 1, 5], "ffn_hidden": 20, "final_norm": True, "tie_head": True}, 12),
}
# (mode, granularity); None = float32
CRYSTAL_MODES = [(None, None), ("int8", "tensor"), ("int16", "tensor"), ("mixed", "tensor"),
                 ("mixed8", "tensor"), ("int8", "row"), ("mixed8", "group:8")]


def _graph(name: str) -> Graph:
    shape, seed = MODELS[name]
    return random_graph(shape, seed=seed, tokenizer={"kind": "char", "chars": CHARS})


# Sources a backend copies verbatim from templates/ are kept in golden/ as their SHA-256:
# a change to them still fails the comparison, without a second copy of the C in the tree
# (the diff is then `git diff templates/`).
VERBATIM = {"crystal.h", "crystal_forward.c", "crystal_cli.c", "crystal_core.v", "crystal_gen.v", "crystal_tb.v",
            "crystal_forward.cu", "unicode_classes.h"}


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        rel = p.relative_to(root).as_posix()
        if p.name in VERBATIM:
            out[rel + ".sha256"] = (hashlib.sha256(p.read_bytes()).hexdigest() + "\n").encode()
        else:
            out[rel] = p.read_bytes()
    return out


def _write(files: dict[str, bytes], root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _stored(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _compare(got_root: Path, golden_root: Path, update: bool) -> None:
    got = _files(got_root)
    if update:
        _write(got, golden_root)
        return
    assert golden_root.is_dir(), f"no golden artifacts at {golden_root}; run pytest --update-golden"
    want = _stored(golden_root)
    assert sorted(got) == sorted(want), f"file set changed: {sorted(set(got) ^ set(want))}"
    for rel in sorted(got):
        if got[rel] == want[rel]:
            continue
        try:
            diff = "".join(difflib.unified_diff(
                want[rel].decode().splitlines(True), got[rel].decode().splitlines(True),
                f"golden/{rel}", f"generated/{rel}", n=2))
            detail = diff[:4000]
        except UnicodeDecodeError:
            first = next(i for i, (a, b) in enumerate(zip(want[rel], got[rel], strict=False)) if a != b) \
                if len(want[rel]) == len(got[rel]) else min(len(want[rel]), len(got[rel]))
            detail = f"binary files differ (sizes {len(want[rel])} vs {len(got[rel])}; first difference at {first})"
        pytest.fail(f"{rel} differs from its golden copy (pytest --update-golden rewrites it):\n{detail}")


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("target", sorted(BACKENDS))
def test_backend_artifacts(tmp_path: Path, model: str, target: str, update_golden: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    get_backend(target).emit(_graph(model), out)
    _compare(out, GOLDEN / model / target, update_golden)


def test_verilog_of_codes(tmp_path: Path, update_golden: bool) -> None:
    # a quantized model's lane ROM holds its codes and their multipliers, laid out for 3 lanes
    from crystalc.passes.quantize import quantize

    out = tmp_path / "out"
    out.mkdir()
    get_backend("verilog").emit(quantize(_graph("odd_d40"), "mixed8", "row"), out, lanes=3)
    _compare(out, GOLDEN / "odd_d40" / "verilog-mixed8-row-3-lanes", update_golden)


def test_spice_frozen_core(tmp_path: Path, update_golden: bool) -> None:
    # the frozen core of a hybrid: only the frozen neurons in the circuit, the rest computed digitally
    out = tmp_path / "out"
    out.mkdir()
    get_backend("spice").emit(_graph("three_blocks"), out, frozen_only=True)
    _compare(out, GOLDEN / "three_blocks" / "spice-frozen-only", update_golden)


@pytest.mark.parametrize("model", sorted(MODELS))
def test_crystal_files(tmp_path: Path, model: str, update_golden: bool) -> None:
    from crystalc.format.crystal import write_crystal
    from crystalc.passes.quantize import quantize

    out = tmp_path / "crystal"
    out.mkdir()
    g = _graph(model)
    for mode, gran in CRYSTAL_MODES:
        name = "float32" if mode is None else f"{mode}-{gran.replace(':', '')}"
        write_crystal(g if mode is None else quantize(g, mode, gran), out / f"{name}.crystal")
    _compare(out, GOLDEN / model / "crystal", update_golden)


def test_emission_is_deterministic(tmp_path: Path) -> None:
    """Two emissions of the same graph are identical (no timestamps, no unordered maps)."""
    for target in sorted(BACKENDS):
        a, b = tmp_path / f"{target}-a", tmp_path / f"{target}-b"
        a.mkdir()
        b.mkdir()
        get_backend(target).emit(_graph("odd_d40"), a)
        get_backend(target).emit(_graph("odd_d40"), b)
        assert _files(a) == _files(b)


def test_emission_does_not_depend_on_the_process(tmp_path: Path) -> None:
    """Another process (hash seed, locale, time zone, working folder with a space, numpy's legacy print
    options, which round str() of a float32) emits the same bytes as this one, eps literals included."""
    shape, seed = MODELS["odd_d40"]
    shape = {**shape, "ln_eps": 1.2345679e-7, "field_eps": 1 / 3000}  # digits legacy printing would drop
    code = ("import sys; from pathlib import Path; import numpy as np; np.set_printoptions(legacy='1.13'); "
            "from crystalc.backends import BACKENDS, get_backend; from tests.conftest import random_graph; "
            f"g = random_graph({shape!r}, seed={seed}, tokenizer={{'kind': 'char', 'chars': {CHARS!r}}}); "
            "[get_backend(t).emit(g, (Path('out') / t).resolve()) for t in sorted(BACKENDS) "
            "if (Path('out') / t).mkdir(parents=True) is None]")
    cwd = tmp_path / "a folder"
    cwd.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "4242", "LC_ALL": "C.UTF-8", "TZ": "Pacific/Chatham",
           "PYTHONPATH": str(GOLDEN.parents[1])}
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    g = random_graph(shape, seed=seed, tokenizer={"kind": "char", "chars": CHARS})
    for target in sorted(BACKENDS):
        here = tmp_path / target
        here.mkdir()
        get_backend(target).emit(g, here)
        assert _files(cwd / "out" / target) == _files(here), target
    assert b"1.2345679e-07f" in (tmp_path / "c" / "model.c").read_bytes()


def test_compare_catches_a_change(tmp_path: Path) -> None:
    """The comparison itself fails on a one-byte change and on an added file."""
    a = tmp_path / "a"
    a.mkdir()
    (a / "model.c").write_text("int x = 1;\n")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _compare(a, b, update=False)
    (b / "model.c").write_text("int x = 2;\n")
    with pytest.raises(pytest.fail.Exception, match="model.c differs"):
        _compare(a, b, update=False)
    (b / "model.c").write_text("int x = 1;\n")
    (a / "extra.bin").write_bytes(b"\0")
    with pytest.raises(AssertionError, match="file set changed"):
        _compare(a, b, update=False)
