"""Batches: overlapping windows cover the corpus, random starts stay in range, ranks split the global batch."""

from __future__ import annotations

import pytest
import torch

from crystalc.errors import CrystalError
from crystalc.train.data import Batches, eval_windows, parse_tokenizer_spec, split


def test_overlap_covers_every_window_once_per_epoch() -> None:
    ids = torch.arange(1000)
    b = Batches(ids, n_ctx=16, batch_size=4, sampling="overlap", seed=0)
    seen = []
    for _ in range(len(b.starts) // 4):
        x, y = b.next()
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
        seen += x[:, 0].tolist()
    assert set(seen) <= set(range(0, 1000 - 16, 8))
    assert len(set(seen)) == len(seen) == (len(b.starts) // 4) * 4  # stride T/2, no repeats within an epoch


def test_random_sampling_and_auto() -> None:
    ids = torch.arange(500)
    b = Batches(ids, n_ctx=10, batch_size=64, sampling="random", seed=1)
    x, y = b.next()
    assert x.shape == (64, 10) and int(y.max()) <= 499
    assert Batches(ids, 10, 4).sampling == "overlap"


def test_ranks_take_slices_of_the_global_batch() -> None:
    ids = torch.arange(2000)
    whole = Batches(ids, 8, 6, "overlap", seed=5)
    parts = [Batches(ids, 8, 3, "overlap", seed=5, rank=r, world=2) for r in range(2)]
    for _ in range(3):
        x, _ = whole.next()
        assert torch.equal(torch.cat([p.next()[0] for p in parts]), x)


def test_split_and_eval_windows() -> None:
    tr, va = split(torch.arange(1000), 0.1, 16)
    assert len(va) == 100 and torch.equal(torch.cat([tr, va]), torch.arange(1000))
    w = eval_windows(va, 16, 4)
    assert w.shape == (4, 17)
    with pytest.raises(CrystalError, match="too few"):
        split(torch.arange(20), 0.1, 16)
    # a held-out share under one window still holds one whole window: T inputs and the next token
    tr, va = split(torch.arange(100), 0.05, 16)
    assert len(va) == 17 and eval_windows(va, 16, 4).shape == (1, 17)


@pytest.mark.parametrize("spec", ["", "bpe", "bpe:10", "bpe:-5", "char:3", "BPE:300",
                                  "bpe:1048577", "bpe:99999999999",  # past MAX_DIM: tokenizers would abort
                                  "bpe:3_00", "bpe:+300", "bpe: 300", "bpe:\uff13\uff10\uff10"])  # int() took these
def test_bad_tokenizer_specs(spec: str) -> None:
    with pytest.raises(CrystalError):
        parse_tokenizer_spec(spec)


def test_eval_windows_of_a_corpus_past_float32s_integers() -> None:
    # found by an audit: float32 starts of a 25M-token corpus rounded the last one past the end (IndexError)
    n_ctx = 8
    for n in (25_245_268, (1 << 24) + 3, (1 << 27) - 5):
        ids = torch.zeros(n + n_ctx, dtype=torch.uint8)
        w = eval_windows(ids, n_ctx, 64)
        assert w.shape == (64, n_ctx + 1)
