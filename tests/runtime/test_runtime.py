"""The portable C runtime against the reference interpreter, on every dtype x scheme and several shapes.

`--logits` prints one `<original-id> <logit>` line per row of the current
vocabulary; it must equal the interpreter's last-position logits within 1e-4
(absolute; the models are tiny and their logits of order 1-50 (hand-quantized
codes make weights near +-1), so this is a few float32 ulps of accumulated
rounding from a different summation order, measured up to 2e-5, while
any real mistake - a wrong scale, a transposed matrix, a missing term - moves
logits by far more).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from crystalc.errors import CrystalError
from crystalc.format.crystal import encode_crystal, write_crystal
from crystalc.ir.interpret import forward, generate
from tests.backends.test_c import greedy_with_margin
from tests.conftest import (
    MIN_SAMPLE_MARGIN,
    UNICODE_TEXT,
    bpe_prompts,
    bpe_tokenizer,
    random_graph,
    require_tool,
    sampled_with_margin,
    save_pt,
)
from tests.format.test_crystal import pruned, quantize_by_hand

# under pytest-xdist the file's tests share one worker, which builds its module fixtures
# (the runtimes built into one cache) once
pytestmark = pytest.mark.xdist_group("test_runtime")

TOL = 1e-4
SHAPES = ["d40_h5", "three_blocks_n0_n1", "tied_unnormalised", "all_on"]
SANITIZER_ENV = {"ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1", "UBSAN_OPTIONS": "print_stacktrace=1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    require_tool("cc")
    path = str(tmp_path_factory.mktemp("crystalc-cache"))
    old = os.environ.get("CRYSTALC_CACHE")
    os.environ["CRYSTALC_CACHE"] = path
    yield path
    if old is None:
        os.environ.pop("CRYSTALC_CACHE", None)
    else:
        os.environ["CRYSTALC_CACHE"] = old


@pytest.fixture(scope="module")
def runtime(cache):
    from crystalc.runtime import build_runtime

    return build_runtime()


@pytest.fixture(scope="module")
def sanitized(cache):
    require_tool("gcc")
    from crystalc.runtime import build_runtime

    return build_runtime(sanitize=True)


def run(exe, *args, sanitizer: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, **SANITIZER_ENV) if sanitizer else None
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def runtime_logits(exe, path, ids: list[int], sanitizer: bool = False) -> tuple[np.ndarray, np.ndarray]:
    res = run(exe, path, "--prompt-ids", ",".join(map(str, ids)), "--logits", sanitizer=sanitizer)
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    return np.array([int(r[0]) for r in rows]), np.array([float(r[1]) for r in rows], dtype=np.float64)


def check_parity(exe, graph, tmp_path, ids: list[int], sanitizer: bool = False) -> None:
    path = tmp_path / "m.crystal"
    write_crystal(graph, path)
    got_ids, got = runtime_logits(exe, path, ids, sanitizer)
    want = forward(graph, graph.to_current_ids(ids))[-1]
    assert np.array_equal(got_ids, graph.original_ids())
    assert np.abs(got - want).max() <= TOL, np.abs(got - want).max()


def prompt(graph) -> list[int]:
    rng = np.random.default_rng(0)
    return [int(x) for x in rng.choice(graph.original_ids(), size=graph.config.n_ctx)]


@pytest.mark.parametrize("shape", SHAPES)
def test_float32_logits_match_the_interpreter(runtime, shape, tmp_path):
    g = random_graph(shape, seed=21)
    check_parity(runtime, g, tmp_path, prompt(g))
    check_parity(runtime, g, tmp_path, prompt(g)[:1])


@pytest.mark.parametrize("dtype", ["i8", "i16"])
@pytest.mark.parametrize("scheme", ["tensor", "row", "group"])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantized_logits_match_the_interpreter(runtime, shape, dtype, scheme, tmp_path):
    g = quantize_by_hand(random_graph(shape, seed=22), dtype, scheme)
    check_parity(runtime, g, tmp_path, prompt(g))


@pytest.mark.parametrize("mode", ["int8", "int16", "mixed", "mixed8"])
@pytest.mark.parametrize("granularity", ["tensor", "row", "group:7"])
def test_quantize_pass_modes_match_the_interpreter(runtime, mode, granularity, tmp_path):
    from crystalc.passes.quantize import quantize

    for shape in SHAPES:  # a tied head (which mixed keeps float32), N = 0 and 1, ragged last groups (7)
        g = quantize(random_graph(shape, seed=23), mode, granularity)
        check_parity(runtime, g, tmp_path, prompt(g))


def test_pruned_model_speaks_original_ids(runtime, tmp_path):
    g = pruned(quantize_by_hand(random_graph("d40_h5", seed=24), "i8", "row"), [1, 3, 4, 8, 15, 22])
    check_parity(runtime, g, tmp_path, [22, 3, 3, 8])
    res = run(runtime, tmp_path / "m.crystal", "--prompt-ids", "2", "--logits")  # 2 was pruned
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1


def test_sanitized_runtime_on_every_scheme(sanitized, tmp_path):
    for scheme in ("tensor", "row", "group"):
        g = quantize_by_hand(random_graph("three_blocks_n0_n1", seed=25), "i8", scheme)
        check_parity(sanitized, g, tmp_path, prompt(g), sanitizer=True)


def test_seeds_v2_file_runs(runtime, tmp_path):
    from crystalc.format.crystal import read_crystal
    from tests.format.seeds_v2_writer import seeds_v2_bytes
    from tests.format.test_seeds_v2 import state

    for mixed8 in (False, True):
        path = tmp_path / "seeds.crystal"
        path.write_bytes(seeds_v2_bytes(state(), n_heads=3, mixed8=mixed8))
        ids, got = runtime_logits(runtime, path, [1, 2, 3, 4])
        want = forward(read_crystal(path), [1, 2, 3, 4])[-1]
        assert np.array_equal(ids, np.arange(29)) and np.abs(got - want).max() <= TOL


def char_model(tmp_path):
    text = "to be or not to be, that is the question\n"
    chars = "".join(sorted(set(text)))
    g = random_graph(dict(vocab_size=len(chars), d_model=16, n_ctx=6, n_heads=2, n_neurons=5, ffn_hidden=32), seed=26,
                     tokenizer={"kind": "char", "chars": chars})
    path = tmp_path / "char.crystal"
    write_crystal(g, path)
    return g, path, chars


def test_greedy_generation_matches_the_interpreter_past_the_window(runtime, tmp_path):
    # seed 52's continuations are varied and differ by shift, so a runtime that attended to the last token
    # only, or ignored --shift, would not match (char_model's own seed repeats one character)
    _, _, chars = char_model(tmp_path)
    g = random_graph(dict(vocab_size=len(chars), d_model=16, n_ctx=6, n_heads=2, n_neurons=5, ffn_hidden=32),
                     seed=52, tokenizer={"kind": "char", "chars": chars})
    path = tmp_path / "greedy.crystal"
    write_crystal(g, path)
    ids = [chars.index(c) for c in "to be"]
    wants = {}
    for shift in (1, 3):  # 5 + 20 tokens: the window (6) slides, or shifts by 3
        rows, margin = greedy_with_margin(g, ids, 20, shift)
        assert margin > 1e-3  # measured 0.14: no step is decided by rounding
        wants[shift] = "".join(chars[i] for i in rows)
        res = run(runtime, path, "--prompt", "to be", "-n", 20, "-t", 0, "--shift", shift)
        assert res.returncode == 0, res.stderr
        assert res.stdout == "to be" + wants[shift] + "\n"
    assert wants[1] != wants[3] and len(set(wants[1])) >= 4


def test_sampled_generation_matches_the_reference_sampler(runtime, tmp_path):
    """Sampling past the window from a quantized file: the same draws as the interpreter with the reference sampler."""
    from crystalc.passes.quantize import quantize

    g, _, chars = char_model(tmp_path)
    g = quantize(g, "mixed8", "row")
    path = tmp_path / "mixed8.crystal"
    write_crystal(g, path)
    ids = [chars.index(c) for c in "to be"]
    want, margin = sampled_with_margin(g, ids, 30, 2, 0.9, 0.8, 5)
    assert margin > MIN_SAMPLE_MARGIN
    res = run(runtime, path, "--prompt", "to be", "-n", 30, "-t", 0.9, "--top-p", 0.8, "--seed", 5, "--shift", 2)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "to be" + "".join(chars[i] for i in want) + "\n"


def test_seeds_positional_form(runtime, tmp_path):
    _, path, _ = char_model(tmp_path)
    spec = run(runtime, path, "--prompt", "to be", "-n", 12, "-t", 0.8, "--seed", 42)
    seeds = run(runtime, path, "to be", 12, 0.8)
    assert spec.returncode == 0 and seeds.returncode == 0, seeds.stderr
    assert seeds.stdout == spec.stdout
    # options after the positional words, as the spec's form takes them
    spec = run(runtime, path, "--prompt", "to be", "-n", 12, "-t", 0.8, "--seed", 7, "--shift", 2)
    seeds = run(runtime, path, "to be", 12, 0.8, "--seed", 7, "--shift", 2)
    assert seeds.returncode == 0 and seeds.stdout == spec.stdout, seeds.stderr
    assert seeds.stdout != run(runtime, path, "to be", 12, 0.8).stdout  # the seed was taken
    twice = run(runtime, path, "to be", 12, "-n", 5)  # the positional N is -n
    assert twice.returncode == 2 and twice.stderr == "crystal_runtime: error: -n given twice\n", twice.stderr


def test_help_names_the_model_argument_wherever_asked(runtime, tmp_path):
    _, path, _ = char_model(tmp_path)
    for args in (["--help"], [path, "--help"], [path, "--prompt", "a", "-h"]):
        res = run(runtime, *args)
        assert res.returncode == 0 and res.stdout.startswith("usage: crystal_runtime MODEL.crystal"), res.stdout
        assert "--threads" in res.stdout
    # a prompt, not a question: a model that has the characters generates from it
    chars = "".join(sorted(set("-help to be")))
    g = random_graph(dict(vocab_size=len(chars), d_model=16, n_ctx=6, n_heads=2, n_neurons=5, ffn_hidden=32), seed=26,
                     tokenizer={"kind": "char", "chars": chars})
    write_crystal(g, tmp_path / "dash.crystal")
    res = run(runtime, tmp_path / "dash.crystal", "--prompt", "--help", "-n", 3)
    assert res.returncode == 0 and res.stdout.startswith("--help") and len(res.stdout) == len("--help") + 3 + 1, \
        (res.stdout, res.stderr)


def test_bad_arguments_exit_2_with_one_line(runtime, tmp_path):
    _, path, _ = char_model(tmp_path)
    cases = {
        "no model": ([], "first argument must be a .crystal"),
        "missing file": ([tmp_path / "missing.crystal", "--prompt", "a"], "cannot open (No such file"),
        # a folder opens on Linux and used to be reported as "out of memory for a 9223372036854775807-byte file"
        "a folder": ([tmp_path, "--prompt", "a"], "cannot read"),
        "id outside": ([path, "--prompt-ids", "999", "--logits"], "outside the vocabulary"),
        # the fifth positional argument used to be blamed on the prompt
        "positional extra": ([path, "to be", 3, 0.8, "extra"], "unexpected argument 'extra'"),
    }
    for label, (args, needle) in cases.items():
        res = run(runtime, *args)
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, (label, res.stderr)
        assert needle in res.stderr, (label, res.stderr)


def test_sanitized_runtime_rejects_corrupt_files(sanitized, tmp_path):
    from tests.format.corrupt import all_cases
    from tests.format.test_corrupt import BASES, python_verdict

    cases = all_cases(BASES["quantized_pruned"])[::7]
    for i, (label, data, _) in enumerate(cases):
        path = tmp_path / f"c{i}.crystal"
        path.write_bytes(data)
        res = run(sanitized, path, "--prompt-ids", "0,1", "--logits", sanitizer=True)
        assert res.returncode in (0, 2), f"{label}: {res.stderr[-3000:]}"
        assert (res.returncode == 0) == (python_verdict(data) is None), label
        if res.returncode == 2:
            assert len(res.stderr.splitlines()) == 1 and res.stdout == "", f"{label}: {res.stderr!r}"


def test_sanitized_runtime_on_overflowing_scales_and_wide_groups(sanitized, tmp_path):
    # finite scales whose codes dequantize past float32 are refused by both readers; a group wider than
    # the row (2^32 - 1, past a C int) is a scale a row, read alike: the runtime's logits are the IR's
    from crystalc.format.crystal import decode_crystal
    from tests.format.corrupt import all_cases
    from tests.format.test_corrupt import BASES, python_verdict

    cases = [(label, data) for label, data, _ in all_cases(BASES["quantized_pruned"])
             if "3e38" in label or "a scale a row" in label]
    assert sum("a scale a row" in label for label, _ in cases) >= 3
    for i, (label, data) in enumerate(cases):
        path = tmp_path / f"c{i}.crystal"
        path.write_bytes(data)
        verdict = python_verdict(data)
        if verdict is not None:
            assert "overflows float32" in verdict, label
            res = run(sanitized, path, "--prompt-ids", "0,1", "--logits", sanitizer=True)
            assert res.returncode == 2 and "overflows float32" in res.stderr, f"{label}: {res.stderr[-2000:]}"
            continue
        graph = decode_crystal(data)
        ids = prompt(graph)
        _, got = runtime_logits(sanitized, path, ids, sanitizer=True)
        assert np.abs(got - forward(graph, graph.to_current_ids(ids))[-1]).max() <= TOL, label


def test_crystalc_run_on_crystal_and_pt(cache, tmp_path):
    g, path, chars = char_model(tmp_path)
    pt = save_pt(g, tmp_path / "m.pt")
    outs = []
    for model in (path, pt):
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "crystalc"), "run", str(model),
                              "--prompt-ids", "1,2,3", "--logits"], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1]
    # said before the checkpoint is converted for the runtime, in crystalc's words
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "crystalc"), "run", str(pt),
                          "--prompt-ids", "1,2,3", "--logits", "-n", "5"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr == ("crystalc: error: -n has no effect with --logits, which prints "
                                                  "the prompt's logits and generates nothing\n"), res.stderr
    want = forward(g, [1, 2, 3])[-1]
    got = np.array([float(line.split()[1]) for line in outs[0].splitlines()])
    assert np.abs(got - want).max() <= TOL
    # a bare state_dict says nothing of its heads: run takes --n-heads as every command reading a model does
    bare = tmp_path / "bare.pt"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()}, bare)
    heads = str(g.config.n_heads)
    for model, extra, status, says in ((bare, [], 2, "pass --n-heads"), (bare, ["--n-heads", heads], 0, ""),
                                       (path, ["--n-heads", str(g.config.n_heads + 1)], 2, "disagrees")):
        res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "crystalc"), "run", str(model),
                              "--prompt-ids", "1,2,3", "--logits", *extra], capture_output=True, text=True, timeout=300)
        assert res.returncode == status and says in res.stderr, res.stderr
        assert status or res.stdout == outs[0]
    bad = tmp_path / "bad.crystal"
    bad.write_bytes(encode_crystal(g)[:-9])
    res = subprocess.run([os.path.join(os.path.dirname(sys.executable), "crystalc"), "run", str(bad),
                          "--prompt-ids", "1"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith("crystalc run: error: "), res.stderr  # the command's name, not the cached binary's


def test_the_runtime_encodes_a_bpe_prompt_as_the_tokenizer_does(runtime, sanitized, tmp_path):
    """A .crystal file carries a byte-level BPE's tables (tokenizer.bpe.*) beside tokenizer.json: the runtime's
    --prompt encodes text as the tokenizers library does (the same logits), and prints the tokens' bytes."""
    from crystalc.format.crystal import read_crystal
    from crystalc.passes.prune_vocab import prune_vocab
    from crystalc.tokenizer import Tokenizer, byte_level_bpe

    spec = bpe_tokenizer()
    tok = Tokenizer(spec)
    g = random_graph(dict(vocab_size=tok.vocab_size, d_model=16, n_ctx=96, n_heads=2, n_neurons=5, ffn_hidden=32),
                     seed=31, tokenizer=spec)
    path = tmp_path / "bpe.crystal"
    write_crystal(prune_vocab(g, None, list(range(tok.vocab_size - 1))), path)  # pruned: the last id gone
    p = read_crystal(path)
    for prompt in bpe_prompts():
        ids = tok.encode(prompt)
        if tok.vocab_size - 1 in ids:
            continue
        res = run(runtime, path, "--prompt", prompt, "--logits")
        assert res.returncode == 0, (prompt, res.stderr)
        got = np.array([float(line.split()[1]) for line in res.stdout.splitlines()])
        assert np.abs(got - forward(p, p.to_current_ids(ids[-p.config.n_ctx:]))[-1]).max() <= TOL, (prompt, ids)
    ids = tok.encode("ROMEO: what")
    pieces = byte_level_bpe(spec["json"]).token_bytes
    want = b"ROMEO: what" + b"".join(pieces[p.original_ids()[r]] for r in generate(p, p.to_current_ids(ids), 20))
    for exe, env in ((runtime, None), (sanitized, dict(os.environ, **SANITIZER_ENV))):
        res = subprocess.run([str(exe), str(path), "--prompt", "ROMEO: what", "-n", "20", "-t", "0"],
                             capture_output=True, timeout=120, env=env)
        assert res.returncode == 0 and res.stdout == want + b"\n", res.stderr
    # the encoder's UTF-8 and class tables under the sanitizers: the plain build's logits, bit for bit
    prompts = [q for q in (UNICODE_TEXT, UNICODE_TEXT[:70], UNICODE_TEXT[::-1], "\U0010fffd \u00a0x\u0301\U0001f600")
               if tok.vocab_size - 1 not in tok.encode(q)]
    assert len(prompts) >= 2
    for prompt in prompts:
        plain, checked = (subprocess.run([str(exe), str(path), "--prompt", prompt, "--logits"], capture_output=True,
                                         timeout=120, env=env) for exe, env in
                          ((runtime, None), (sanitized, dict(os.environ, **SANITIZER_ENV))))
        assert plain.returncode == checked.returncode == 0 and plain.stdout == checked.stdout, checked.stderr


def test_crystalc_run_speaks_text_for_a_bpe_model(cache, tmp_path):
    """`crystalc run` encodes a BPE prompt itself and decodes what it generates as the tokenizers library
    does."""
    from crystalc.tokenizer import Tokenizer
    from crystalc.train.data import build_tokenizer

    spec = build_tokenizer("to be or not to be, that is the question\n" * 20, "bpe:270")
    tok = Tokenizer(spec)
    g = random_graph(dict(vocab_size=tok.vocab_size, d_model=16, n_ctx=6, n_heads=2, n_neurons=5, ffn_hidden=32),
                     seed=27, tokenizer=spec)
    ids = tok.encode("to be")
    want = tok.decode(ids + generate(g, ids, 12)) + "\n"  # 12 greedy tokens past a 6-token window
    crystal = tmp_path / "bpe.crystal"
    write_crystal(g, crystal)
    exe = os.path.join(os.path.dirname(sys.executable), "crystalc")
    for model in (save_pt(g, tmp_path / "bpe.pt"), crystal):
        res = subprocess.run([exe, "run", str(model), "--prompt", "to be", "-n", "12", "-t", "0"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert res.stdout == want
    # one token a byte: 60,000 of them are over 128 KiB as a list of ids, more than one argument may hold;
    # only the window's last n_ctx go to the runtime, which keeps no more (the spec)
    long = "zq" * 30_000
    long_ids = tok.encode(long)
    assert len(",".join(map(str, long_ids))) > 1 << 17
    res = subprocess.run([exe, "run", str(crystal), "--prompt", long, "-n", "3", "-t", "0"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout == tok.decode(long_ids + generate(g, long_ids[-6:], 3)) + "\n", \
        res.stderr
    res = subprocess.run([exe, "run", str(crystal), "--prompt", "to be", "--prompt-ids", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "exactly one of --prompt and --prompt-ids" in res.stderr
    # a token of the prompt that pruning dropped is named as text, not as an id the user never gave
    from crystalc.passes.prune_vocab import prune_vocab

    pruned = tmp_path / "pruned.crystal"
    write_crystal(prune_vocab(g, None, [i for i in range(tok.vocab_size) if i != ids[-1]]), pruned)
    res = subprocess.run([exe, "run", str(pruned), "--prompt", "to be", "-n", "2"],
                         capture_output=True, text=True, timeout=300)
    lost = tok.decode([ids[-1]])
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert f"--prompt: token {lost!r} (id {ids[-1]}) was pruned" in res.stderr, res.stderr


@pytest.mark.parametrize("name", ["two_blocks", "plain", "seeds_layout"])
def test_spec_vectors_through_crystal_file(runtime, name, tmp_path):
    """The spec's independent float64 logits, through .pt -> .crystal -> the runtime."""
    import json

    from crystalc.frontend import load_model
    from tests.conftest import SPEC_VECTORS

    expected = json.loads((SPEC_VECTORS / "expected.json").read_text())[name]
    path = tmp_path / f"{name}.crystal"
    write_crystal(load_model(SPEC_VECTORS / f"{name}.pt"), path)
    for case in expected["cases"]:
        _, got = runtime_logits(runtime, path, case["prompt_ids"])
        assert np.abs(got - np.array(case["logits"])).max() <= TOL


def test_a_damaged_cache_entry_is_rebuilt_and_one_that_cannot_run_is_one_line(cache, tmp_path, monkeypatch):
    """A crash can leave an entry empty; a mode or a noexec mount can keep it from running."""
    require_tool("cc")
    from crystalc.runtime import build_runtime

    exe = build_runtime()
    exe.write_bytes(b"")
    assert build_runtime() == exe and exe.stat().st_size > 0  # rebuilt, not trusted
    exe.chmod(0o644)
    assert build_runtime() == exe and os.access(exe, os.X_OK)
    model = tmp_path / "m.crystal"
    write_crystal(random_graph("d40_h5", seed=1), model)
    import crystalc.runtime as runtime

    real_run = runtime.subprocess.run

    def cannot_run(cmd, *args, **kwargs):  # the runtime runs as "crystalc run", its path the executable
        if str(kwargs.get("executable")) != str(exe):  # the compiler's --version, for the cache key, still answers
            return real_run(cmd, *args, **kwargs)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(runtime.subprocess, "run", cannot_run)
    with pytest.raises(CrystalError, match="cannot run the runtime .*set CRYSTALC_CACHE"):
        runtime.run_model(model, ["--prompt-ids", "1", "--logits"])

    def too_long(cmd, *args, **kwargs):  # what the kernel says of an argument over 128 KiB
        if str(kwargs.get("executable")) != str(exe):
            return real_run(cmd, *args, **kwargs)
        raise OSError(7, "Argument list too long")

    monkeypatch.setattr(runtime.subprocess, "run", too_long)
    with pytest.raises(CrystalError, match="more than one command-line argument may hold"):
        runtime.run_model(model, ["--prompt-ids", "1", "--logits"])


def test_the_cache_keeps_the_newest_builds(tmp_path, monkeypatch):
    # an audit: every new compiler, flag or crystalc left a binary behind for good
    require_tool("cc")
    from crystalc.runtime import KEEP_BUILDS, build_runtime

    monkeypatch.setenv("CRYSTALC_CACHE", str(tmp_path))
    old = []
    for i in range(KEEP_BUILDS + 2):
        d = tmp_path / f"crystal_runtime-0.0.{i}-{i:016x}"
        d.mkdir()
        (d / "crystal_runtime").write_bytes(b"#!")
        os.utime(d / "crystal_runtime", (1000.0 + i, 1000.0 + i))  # the older, the smaller i
        old.append(d)
    (tmp_path / "crystal_check-0.0.0-0").mkdir()  # another program's builds count apart
    exe = build_runtime()
    kept = sorted(p for p in tmp_path.iterdir() if p.name.startswith("crystal_runtime-"))
    assert exe.parent in kept and len(kept) == KEEP_BUILDS
    assert set(kept) - {exe.parent} == set(old[-(KEEP_BUILDS - 1):])  # the newest of the rest
    assert (tmp_path / "crystal_check-0.0.0-0").is_dir()


def test_the_cache_knows_the_compiler_behind_cc(cache, tmp_path, monkeypatch):
    """cc upgraded, or pointed from gcc to clang, under the same name: a build of its own, not the old binary."""
    require_tool("cc")
    from crystalc.runtime import build_runtime

    for version in ("1.0", "2.0"):  # (its --version speaks the locale's language, as gcc's does)
        (tmp_path / "cc").write_text(f'#!/bin/sh\n[ "$1" = --version ] && {{ echo "fake cc {version} '
                                     '${LC_ALL:-$LANG}"; exit 0; }\nexec cc "$@"\n')
        (tmp_path / "cc").chmod(0o755)
        monkeypatch.setenv("CC", str(tmp_path / "cc"))
        monkeypatch.delenv("LC_ALL", raising=False)
        monkeypatch.setenv("LANG", "de_DE.UTF-8")
        exe = build_runtime()
        monkeypatch.setenv("LANG", "fr_FR.UTF-8")
        assert build_runtime() == exe  # cached while the compiler stays the same, whatever the locale
        if version == "1.0":
            first = exe
    assert exe != first and exe.is_file() and first.is_file()
    monkeypatch.setenv("CC", "cc -DCRYSTAL_UNUSED=1")  # a command and its own flags, as make takes $CC
    assert build_runtime() not in (exe, first)
    monkeypatch.setenv("CC", "true")
    with pytest.raises(CrystalError, match="made no program .*is CC a C compiler"):
        build_runtime()
    # an audit's CC="cc -ffast-math" built a runtime 0.96 off on the bundled model: refused, as the Makefiles do
    monkeypatch.setenv("CC", "cc -ffast-math -O2")
    with pytest.raises(CrystalError, match="CC='cc -ffast-math -O2' has -ffast-math, which changes the arithmetic"):
        build_runtime()


def test_a_reader_that_stops_early_is_the_runtime_s_sigpipe(cache, tmp_path):
    # an audit: `crystalc run ... | head -c 10` exited 243 (sys.exit of subprocess's -13); a shell says 141
    _, path, _ = char_model(tmp_path)
    proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "crystalc"), "run", str(path),
                             "--prompt-ids", "1", "-n", "1000000", "-t", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    proc.stdout.read(10)
    proc.stdout.close()
    assert proc.wait(timeout=300) == 128 + signal.SIGPIPE
