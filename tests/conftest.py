"""Shared fixtures: tiny random crystal models built from a seed, and tool requirements."""

from __future__ import annotations

import importlib
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pytest

from crystalc.config import ModelConfig
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import generate
from crystalc.ir.sampling import Sampler, SplitMix64, first_argmax, nucleus, probabilities
from crystalc.ir.tensor import Tensor

REPO = Path(__file__).resolve().parents[1]
# Copies of ../shared/spec/vectors and ../shared/data/tinyshakespeare.txt, so that a clone tests on
# its own; tests/test_data_copies.py keeps them equal to the originals where ../shared is present.
TEST_DATA = REPO / "tests" / "data"
SHARED = REPO.parent / "shared"
SPEC_VECTORS = TEST_DATA / "spec_vectors"
CORPUS = TEST_DATA / "tinyshakespeare.txt"

# Shapes every backend's parity tests run on. Odd on purpose: D not a power of
# two, a block with no neurons and one with a single neuron, several blocks,
# each of field_norm / final_norm / tie_head on and off.
FIXTURE_SHAPES: dict[str, dict[str, Any]] = {
    "d40_h5": dict(vocab_size=23, d_model=40, n_ctx=9, n_heads=5, n_blocks=1, n_neurons=7, ffn_hidden=80),
    "three_blocks_n0_n1": dict(vocab_size=19, d_model=12, n_ctx=7, n_heads=3, n_blocks=3,
                               n_neurons=[0, 1, 5], ffn_hidden=20, final_norm=True),
    "tied_unnormalised": dict(vocab_size=31, d_model=24, n_ctx=8, n_heads=2, n_blocks=2, n_neurons=[4, 3],
                              ffn_hidden=36, field_norm=False, tie_head=True),
    # and eps values other than the defaults, which every backend must read from the model, not assume
    "all_on": dict(vocab_size=17, d_model=8, n_ctx=5, n_heads=1, n_blocks=1, n_neurons=2, ffn_hidden=8,
                   final_norm=True, tie_head=True, ln_eps=0.05, field_eps=0.5),
}


def random_state(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Canonical state_dict of a random model, scaled like a trained one (not like an init)."""
    rng = np.random.default_rng(seed)
    d, f, v, t = cfg.d_model, cfg.ffn_hidden, cfg.vocab_size, cfg.n_ctx

    def r(*shape: int, s: float = 1.0) -> np.ndarray:
        return (rng.standard_normal(shape) * s).astype(np.float32)

    sd: dict[str, np.ndarray] = {"token_embed.weight": r(v, d), "pos_embed.weight": r(t, d, s=0.3)}
    for b, n in enumerate(cfg.n_neurons):
        p = f"blocks.{b}"
        for ln in ("ln1", "ln2", "ln3"):
            sd[f"{p}.{ln}.weight"] = (1 + r(d, s=0.1)).astype(np.float32)
            sd[f"{p}.{ln}.bias"] = r(d, s=0.1)
        for proj in ("q", "k", "v", "out"):
            sd[f"{p}.attn.{proj}_proj.weight"] = r(d, d, s=d ** -0.5)
            sd[f"{p}.attn.{proj}_proj.bias"] = r(d, s=0.1)
        sd[f"{p}.field.positions"] = r(n, d)
        sd[f"{p}.field.values"] = r(n, d, s=0.5)
        sd[f"{p}.field.temperature"] = r(n, s=2.0)
        sd[f"{p}.field.frozen"] = rng.random(n) < 0.5
        sd[f"{p}.ffn.fc1.weight"] = r(f, d, s=d ** -0.5)
        sd[f"{p}.ffn.fc1.bias"] = r(f, s=0.1)
        sd[f"{p}.ffn.fc2.weight"] = r(d, f, s=f ** -0.5)
        sd[f"{p}.ffn.fc2.bias"] = r(d, s=0.1)
    if cfg.final_norm:
        sd["ln_f.weight"] = (1 + r(d, s=0.1)).astype(np.float32)
        sd["ln_f.bias"] = r(d, s=0.1)
    if not cfg.tie_head:
        sd["head.weight"] = r(v, d, s=d ** -0.5)
    sd["head.bias"] = r(v, s=0.1)
    return sd


def random_graph(shape: str | dict[str, Any], seed: int = 0, tokenizer: dict | None = None) -> Graph:
    from crystalc.ir.graph import build_graph

    cfg = ModelConfig.from_dict(FIXTURE_SHAPES[shape] if isinstance(shape, str) else shape)
    params = {k: Tensor(k, v) for k, v in random_state(cfg, seed).items()}
    return build_graph(cfg, params, tokenizer)


def save_pt(graph: Graph, path: Path, tokenizer: dict | None = None) -> Path:
    """Write a graph as the spec's .pt checkpoint."""
    import torch

    ckpt = {
        "format": "crystalc-checkpoint", "version": 1, "config": graph.config.to_dict(),
        "model": {k: torch.from_numpy(np.array(v)) for k, v in graph.state_dict().items()}, "meta": {},
    }
    if tokenizer or graph.tokenizer:
        ckpt["tokenizer"] = tokenizer or graph.tokenizer
    torch.save(ckpt, path)
    return path


def in_ci() -> bool:
    """CI=true as .ci/run sets it, and the other spellings CI services use (1, yes, TRUE)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_tool(*names: str) -> None:
    """Skip when a tool is missing, except in CI, where a missing tool is a failure."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        tool_missing(f"missing tool(s): {', '.join(missing)}")


def tool_missing(msg: str) -> NoReturn:
    """A skip saying what is missing, except in CI, where a missing tool is a failure."""
    if in_ci():
        pytest.fail(msg + " (CI=true: tool-backed tests may not skip)")
    pytest.skip(msg)


def require_module(name: str) -> Any:
    """The module, or a skip when it is not installed, except in CI, where the dev extra installs it."""
    if in_ci():
        try:
            return importlib.import_module(name)
        except ImportError as e:
            pytest.fail(f"missing module {name} ({e}; CI=true: the dev extra installs it, tests may not skip)")
    return pytest.importorskip(name)


@pytest.fixture(params=sorted(FIXTURE_SHAPES))
def fixture_graph(request: pytest.FixtureRequest) -> Graph:
    return random_graph(request.param, seed=1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite tests/golden/ from the current generators instead of comparing")


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


# Sampled continuations are only comparable where no decision of the reference sampler is a
# near-tie. Relative to the total mass: the C's logit error of ~1e-6 moves a probability
# exp(logit / t) by ~1e-6 / t of itself, and the running sums no more.
MIN_SAMPLE_MARGIN = 1e-5


def sampled_with_margin(graph: Graph, prompt: list[int], n: int, shift: int, temperature: float, top_p: float,
                        seed: int) -> tuple[list[int], float]:
    """The reference sampler's continuation, and how close its decisions came to a tie.

    The decisions are threshold tests: whether each nucleus member clears the
    pre-sort cutoff (the tokens below it the nucleus never reaches), where the
    running mass of the most likely tokens passes top_p of the total (the
    nucleus' last member), and where the running sums pass the uniform draw.
    The margin is the smallest gap at those thresholds, relative to the total
    mass; the C's logits differ by ~1e-6, so a margin far above that means the C
    decides the same way.
    """
    sampler = Sampler(temperature, top_p, seed)
    gaps: list[float] = []

    def crossing(sums: np.ndarray, level: float) -> list[float]:
        """|sum - level| for the first running sum past the level and the one before it."""
        k = int(np.searchsorted(sums, level, side="right"))
        return [abs(sums[j] - level) for j in (k - 1, k) if 0 <= j < len(sums)]

    def pick(logits: np.ndarray) -> int:
        p = probabilities(logits, temperature)
        ids, total = nucleus(p, top_p, first_argmax(logits))
        full = sum(p)
        if top_p < 1:
            cutoff = (1 - top_p) / (len(p) - 1) * full if len(p) > 1 else 0.0
            gaps.extend(abs(p[i] - cutoff) / full for i in ids)
            ranked = sorted(range(len(p)), key=lambda i: -p[i])
            gaps.extend(g / full for g in crossing(np.cumsum([p[i] for i in ranked]), top_p * full))
        r = SplitMix64(sampler.rng.state).uniform() * total
        gaps.extend(g / total for g in crossing(np.cumsum([p[i] for i in ids]), r))
        return sampler(logits)

    return generate(graph, prompt, n, shift, pick), min(gaps)


# Text past ASCII in each of GPT-2's classes: letters (accented, Greek, Cyrillic with U+1C89, new in Unicode
# 16, CJK, a title-case digraph, a 4-byte one), numbers (Arabic-Indic, superscripts, Roman, fractions), spaces
# (no-break, ideographic, em, line separator, NEL) and the rest (combining marks, punctuation, emoji).
# `bpe_tokenizer` learns merges of its bytes, so that a character put in the wrong class changes the ids.
UNICODE_TEXT = ("Roméo et Juliette, café naïve façade. Ωμέγα λόγος. Мир и война \u1c89. 日本語のテキスト。"
                " ١٢٣ ٤٥٦ x²³ Ⅻ ½ \U0001d400\U0001d401 — «quoted» ‘single’ “double” … 😀👍 e\u0301t\u0301"
                " a\u0308\u00a0non-breaking\u3000ideographic\u2003em\u2003\u2003space end\u2028line\u0085next"
                " ﬁne Ǆwarf ᾈ \u00a0\u00a0Roméo\u3000 \u3000"
                # a class's characters past ASCII beside its ASCII ones, so that merges cross between them: one
                # past ASCII put in another class splits the piece, and the merge is missed
                " Ⅻ12 ١٢3 ²7 テキストabc Ωmega 𝐀bc na\u0308\u0301!! —!! …?? 😀!! x\n\u3000\n\u00a0\n\u2003\t\u0085\n\n")


def bpe_prompts() -> list[str]:
    """GPT-2's pre-tokenizer's every branch (contractions, ' ?' before letters, digits and punctuation, runs
    of spaces at the end and before a word, every ASCII control character), runs of one letter (a pair merged
    twice in a piece: the leftmost first), line ends of \\r\\n (\\r a space: with `bpe_tokenizer`'s merges of
    them), text past ASCII in every class, then random ASCII and random text past it."""
    fixed = ["ROMEO: what's this?", "  hello  world\n\n\nthere ", "it's 123abc 4.5 'tis I'll we've they'd",
             "\t\t x\r\n y", "a'S don't 'x", " ", "\n", "''s 're", "x  ", "!!!  ...,,, ;;", "a\x0bb\x0cc",
             "".join(map(chr, range(1, 128))), "thee eee ooo lll sss ttt rrr eeeee", "hark!\r\n\r\n",
             "so\r\n\r\nthen \r\n", "e" * 3001, "hello" * 700 + " thee" * 300,  # long pieces: many merges
             UNICODE_TEXT, " café", "Roméo\u00a0\u00a0Juliette", "\u3000\u3000word", "e\u0301\u0301t", "١٢3 x²y",
             "\u2003 Ωμέγα", "mot\u0085", "日本語 テキスト", "😀😀 👍"]
    fixed += [UNICODE_TEXT[i:i + 40] for i in range(0, len(UNICODE_TEXT), 40)]  # within a 96-token window
    rng = np.random.default_rng(5)
    alphabet = [chr(c) for c in range(1, 128)] + [" "] * 10 + list("abcde ' 12") * 4
    fixed += ["".join(rng.choice(alphabet, size=rng.integers(1, 40))) for _ in range(150)]
    beyond = sorted(set(UNICODE_TEXT) - set(alphabet)) * 3 + [  # and code points from anywhere, assigned or not
        chr(c) for c in rng.integers(0x80, 0x110000, size=60) if not 0xD800 <= c <= 0xDFFF]
    return fixed + ["".join(rng.choice(alphabet + beyond, size=rng.integers(1, 40))) for _ in range(100)]


def bpe_tokenizer() -> dict:
    """A byte-level BPE as `crystalc train --tokenizer bpe:500` trains it, on Shakespeare with some lines ended
    by \\r\\n, so that its merges join \\r (a space to GPT-2's pattern) as well as letters, and with
    UNICODE_TEXT among them, so that they join bytes of characters past ASCII too."""
    from crystalc.train.data import build_tokenizer

    text = CORPUS.read_text()[:50_000]
    return build_tokenizer(text[:25_000] + text[25_000:].replace("\n", "\r\n") + UNICODE_TEXT * 120, "bpe:500")
