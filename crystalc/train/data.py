"""Training data: the tokenizer, the train/validation split, and batches of sequences.

Two ways to cut a corpus into sequences, because the seeds needed both: overlapping
windows with stride context/2 cover a small corpus completely every epoch (the
seeds' 2.55 baseline depended on it), and random start positions avoid listing
hundreds of millions of windows for a large one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crystalc.config import MAX_DIM
from crystalc.errors import CrystalError
from crystalc.fsutil import read_text
from crystalc.tokenizer import Tokenizer, char_tokenizer

# Below this many training tokens, overlapping windows (stride T/2) are listed and
# shuffled each epoch; above it, start positions are drawn at random.
OVERLAP_MAX_TOKENS = 20_000_000


def read_corpus(path: str | Path) -> str:
    text = read_text(path, "data")
    if not text:
        raise CrystalError(f"{path}: the corpus is empty")
    return text


def parse_tokenizer_spec(spec: str) -> tuple[str, int]:
    """'char' -> ('char', 0); 'bpe:N' -> ('bpe', N)."""
    if spec == "char":
        return "char", 0
    if spec.startswith("bpe:"):
        digits = spec[4:]  # ASCII digits only, as every count on the command line: not '3_00', '+300', '３００'
        n = int(digits) if digits.isascii() and digits.isdigit() and len(digits) <= 8 else -1
        if 260 <= n <= MAX_DIM:
            return "bpe", n
        raise CrystalError(f"tokenizer {spec!r}: bpe:N needs an integer vocabulary size 260 <= N <= {MAX_DIM} "
                           "(256 bytes + merges)")
    raise CrystalError(f"tokenizer {spec!r}: expected 'char' or 'bpe:N'")


def build_tokenizer(text: str, spec: str) -> dict[str, Any]:
    """The checkpoint's tokenizer dict, trained on `text`."""
    kind, n = parse_tokenizer_spec(spec)
    if kind == "char":
        return char_tokenizer(text)
    try:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise CrystalError("tokenizer bpe:N needs the 'tokenizers' package (pip install 'crystalc[bpe]')") from None
    # Byte-level BPE: every text encodes (no unknown token), and decode inverts encode.
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_chunks(text), trainer=trainer)
    return {"kind": "hf-tokenizers", "json": tok.to_str()}


def _chunks(text: str, size: int = 1 << 16) -> Iterator[str]:
    for i in range(0, len(text), size):
        yield text[i:i + size]


def encode(text: str, tokenizer: dict[str, Any]) -> torch.Tensor:
    return torch.tensor(Tokenizer(tokenizer).encode(text), dtype=torch.long)


def corpus_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split(ids: torch.Tensor, val_frac: float, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `val_frac` of the corpus is held out (a contiguous tail, so no window straddles both)."""
    n_val = int(len(ids) * val_frac)
    if val_frac > 0:
        n_val = max(n_val, n_ctx + 1)
    if len(ids) - n_val < n_ctx + 1:
        raise CrystalError(f"the corpus has {len(ids)} tokens: too few for context {n_ctx} "
                           f"with a {val_frac * 100:g}% validation split")
    return ids[:len(ids) - n_val], ids[len(ids) - n_val:]


@dataclass
class Batches:
    """Batches of (input, target) windows of length T from one token stream.

    Deterministic from `seed`; under data parallelism every rank draws the same
    global order and takes its own slice of each global batch, so the ranks together
    see exactly what one process with batch size B x world would.
    """

    ids: torch.Tensor
    n_ctx: int
    batch_size: int
    sampling: str = "auto"
    seed: int = 0
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.sampling == "auto":
            self.sampling = "overlap" if len(self.ids) <= OVERLAP_MAX_TOKENS else "random"
        if self.sampling not in ("overlap", "random"):
            raise CrystalError(f"sampling {self.sampling!r}: expected auto, overlap or random")
        self.n_windows = len(self.ids) - self.n_ctx  # start positions with a full target
        stride = max(1, self.n_ctx // 2)
        self.starts = torch.arange(0, self.n_windows, stride)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.cursor = 0
        self.epoch = 0

    def _next_starts(self) -> torch.Tensor:
        g = self.batch_size * self.world
        if self.sampling == "random":
            s = torch.randint(0, self.n_windows, (g,), generator=self.gen)
        else:
            if self.cursor + g > len(self.order):
                # A new epoch: every window once, in a fresh order (a short tail is dropped).
                self.order = self.starts[torch.randperm(len(self.starts), generator=self.gen)]
                if len(self.order) < g:
                    reps = -(-g // len(self.order))
                    self.order = self.order.repeat(reps)
                self.cursor = 0
                self.epoch += 1
            s = self.order[self.cursor:self.cursor + g]
            self.cursor += g
        return s[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self._next_starts()
        idx = s.unsqueeze(1) + torch.arange(self.n_ctx + 1)
        w = self.ids[idx]
        return w[:, :-1], w[:, 1:]


def eval_windows(ids: torch.Tensor, n_ctx: int, max_windows: int) -> torch.Tensor:
    """Fixed, evenly spread validation windows [K, T+1] (the same ones at every evaluation)."""
    n = len(ids) - n_ctx
    k = min(max_windows, max(1, n // n_ctx)) if n > 0 else 0
    if k == 0:
        return torch.empty(0, n_ctx + 1, dtype=torch.long)
    # float32 steps, as runs have always had them (the probe windows steer freezing); past 2^24 tokens the
    # last start can round up beyond n - 1, hence the clamp
    starts = torch.linspace(0, n - 1, k).long().clamp_(max=n - 1)
    return ids[starts.unsqueeze(1) + torch.arange(n_ctx + 1)]
