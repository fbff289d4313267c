"""The prune-vocab pass: kept rows bit-identical, kept logits unchanged, id maps compose."""

from __future__ import annotations

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.ir import interpret
from crystalc.ir.interpret import forward, generate
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from crystalc.tokenizer import Tokenizer
from tests.conftest import FIXTURE_SHAPES, random_graph

CHARS = "\n !',.:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # 61 characters
CORPUS = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"


def char_graph(shape: str = "d40_h5", seed: int = 0, quant: tuple[str, str] | None = None):
    cfg = dict(FIXTURE_SHAPES[shape], vocab_size=len(CHARS))
    g = random_graph(cfg, seed=seed, tokenizer={"kind": "char", "chars": CHARS})
    return quantize(g, *quant) if quant else g


@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
@pytest.mark.parametrize("quant", (None, ("int8", "tensor"), ("int8", "row"), ("mixed8", "group:3")))
def test_kept_tokens_logits_unchanged(shape: str, quant, monkeypatch: pytest.MonkeyPatch) -> None:
    g = char_graph(shape, seed=2, quant=quant)
    p = prune_vocab(g, CORPUS, [])
    kept = sorted(set(Tokenizer(g.tokenizer).encode(CORPUS)))
    assert p.vocab_map.dtype == np.int64 and p.vocab_map.tolist() == kept
    assert p.config.vocab_size == len(kept) and p.orig_vocab_size == len(CHARS)
    ids = Tokenizer(g.tokenizer).encode(CORPUS)[: g.config.n_ctx]
    full = forward(g, ids)
    pruned = forward(p, p.to_current_ids(ids))
    # Rows are copied bit for bit: the embedding rows, head rows and biases of kept tokens
    # are identical, and so is the hidden state the head reads ...
    np.testing.assert_array_equal(p.token_embed.weight.values(), g.token_embed.weight.values()[kept])
    np.testing.assert_array_equal(p.head_weight.values(), g.head_weight.values()[kept])
    np.testing.assert_array_equal(p.head.bias.values(), g.head.bias.values()[kept])
    monkeypatch.setattr(interpret, "head", lambda op, weight, h, tap=None: h)
    np.testing.assert_array_equal(forward(p, p.to_current_ids(ids)), forward(g, ids))
    # ... but the interpreter's head is one BLAS sgemm, whose summation order depends on the
    # matrix's row count, so a kept logit may differ in its last bit (seen: 1.2e-7 on 0.79).
    np.testing.assert_allclose(pruned, full[:, kept], rtol=1e-6, atol=1e-6)


def test_generation_speaks_original_ids() -> None:
    g = char_graph("d40_h5", seed=4)
    p = prune_vocab(g, CORPUS, [])
    prompt = Tokenizer(g.tokenizer).encode("ROMEO:")
    out = generate(p, p.to_current_ids(prompt), 12)
    original = [int(p.vocab_map[i]) for i in out]
    assert set(original) <= set(p.vocab_map.tolist())
    # greedy over the kept tokens of the full model gives the same text
    kept = p.vocab_map

    def pick_kept(logits: np.ndarray) -> int:
        return int(kept[np.argmax(logits[kept])])

    want = generate(g, prompt, 12, pick=pick_kept)
    assert original == want


def test_pruning_twice_composes_the_maps() -> None:
    g = char_graph("three_blocks_n0_n1", seed=5)
    first = prune_vocab(g, CORPUS, [Tokenizer(g.tokenizer).encode("Z")[0]])
    second = prune_vocab(first, "what light", [])
    direct = prune_vocab(g, "what light", [])
    np.testing.assert_array_equal(second.vocab_map, direct.vocab_map)
    assert second.orig_vocab_size == len(CHARS)
    for a, b in zip(second.tensors(), direct.tensors(), strict=True):
        np.testing.assert_array_equal(a.values(), b.values())
    # ids that the first pruning removed cannot come back, and explicit requests for them fail
    assert "q" not in CORPUS
    with pytest.raises(CrystalError, match="pruned"):
        prune_vocab(first, "", Tokenizer(g.tokenizer).encode("q"))
    # and a corpus's are counted (an audit: they vanished without a word); "qqxq": q and x, if CORPUS lacks x
    assert second.meta["prune_vocab"]["removed_tokens"] == 0
    lost = sorted(set("qx") - set(CORPUS) - set("Z"))
    assert prune_vocab(first, "what light qqxq", []).meta["prune_vocab"]["removed_tokens"] == len(lost) >= 1


def test_tied_head_slices_the_embedding_once() -> None:
    g = char_graph("tied_unnormalised", seed=6, quant=("int8", "row"))
    p = prune_vocab(g, CORPUS, [])
    assert p.head.weight is None and p.head_weight is p.token_embed.weight
    p.verify()


def test_chars_missing_from_the_vocabulary_are_skipped_and_counted() -> None:
    g = char_graph()
    p = prune_vocab(g, "abc\u00e9\u00e9 x\t", [])
    assert p.meta["prune_vocab"]["skipped_chars"] == 3
    assert p.vocab_map.tolist() == sorted(CHARS.index(c) for c in "abc x")


def test_keep_ids_and_no_tokenizer() -> None:
    g = random_graph("all_on", seed=1)  # no tokenizer
    with pytest.raises(CrystalError, match="no tokenizer"):
        prune_vocab(g, "some text", [])
    p = prune_vocab(g, None, [9, 3, 3, 0])
    assert p.vocab_map.tolist() == [0, 3, 9]
    np.testing.assert_allclose(forward(p, [2, 0, 1]), forward(g, [9, 0, 3])[:, [0, 3, 9]], rtol=1e-6, atol=1e-6)
    with pytest.raises(CrystalError, match="outside the vocabulary"):
        prune_vocab(g, None, [17])
    with pytest.raises(CrystalError, match="nothing to keep"):
        prune_vocab(g, "", [])


def test_corpus_with_no_known_token() -> None:
    with pytest.raises(CrystalError, match="nothing would be kept"):
        prune_vocab(char_graph(), "\u00e9\u00e8", [])
