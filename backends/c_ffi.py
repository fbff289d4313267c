"""Run a model compiled by the C backend in-process: the generated code as a shared library, via cffi.

The parity tests use it to get logits for whole sequences as numpy arrays
without going through text. It calls `model_forward` of the generated model.c,
which runs crystal_forward.c over all positions in one batch and then the head
on every position, and `model_decode`, which computes the last position's
logits the way the program generates (a window, then one token at a time
through the KV cache).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import cffi
import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import check_ids

CDEF = """
const char *model_check(void);
int model_forward(const int32_t *ids, int n, float *out);
int model_decode(const int32_t *ids, int n, int split, float *out);
"""


class CModel:
    """A built libmodel.so of one graph, loaded once."""

    def __init__(self, library: Path, vocab_size: int, n_ctx: int) -> None:
        self.ffi = cffi.FFI()
        self.ffi.cdef(CDEF)
        try:
            self.lib = self.ffi.dlopen(str(library))
        except OSError as e:
            raise CrystalError(f"{library}: cannot load the compiled model ({e})") from None
        bad = self.lib.model_check()
        if bad != self.ffi.NULL:
            raise CrystalError(f"{library}: {self.ffi.string(bad).decode()}")
        self.vocab_size = vocab_size
        self.n_ctx = n_ctx

    def _ids(self, ids: list[int] | np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(check_ids(ids, self.n_ctx, self.vocab_size), dtype=np.int32)

    def forward(self, ids: list[int] | np.ndarray) -> np.ndarray:
        """Logits [S, V] (float32) for current-vocabulary ids, 1 <= S <= n_ctx, like interpret.forward."""
        arr = self._ids(ids)
        s = len(arr)
        out = np.empty((s, self.vocab_size), dtype=np.float32)
        rc = self.lib.model_forward(self.ffi.from_buffer("int32_t[]", arr), s, self.ffi.from_buffer("float[]", out))
        if rc != 0:
            raise CrystalError("the compiled model refused the sequence (or ran out of memory)")
        return out

    def decode(self, ids: list[int] | np.ndarray, split: int) -> np.ndarray:
        """Logits [V] of the last id, computed as generation does: ids[:split] as one window (no
        logits), then one token at a time through the KV cache."""
        arr = self._ids(ids)
        if not 1 <= split <= len(arr):
            raise CrystalError(f"split {split} outside 1..{len(arr)}")
        out = np.empty(self.vocab_size, dtype=np.float32)
        rc = self.lib.model_decode(self.ffi.from_buffer("int32_t[]", arr), len(arr), split,
                                   self.ffi.from_buffer("float[]", out))
        if rc != 0:
            raise CrystalError("the compiled model refused the sequence (or ran out of memory)")
        return out


def load(graph: Graph, out_dir: Path, cflags: str | None = None) -> CModel:
    """Emit `graph` into out_dir, build libmodel.so and load it.

    A file already there with the same bytes is left alone, so that make rebuilds only what changed
    (nothing, for a folder built from this graph before). The library is loaded from a copy named by
    its content: dlopen hands back the library first loaded from a path for as long as the process
    lives, so a folder rebuilt for another graph would otherwise still run the old one.
    """
    from crystalc.backends.c import BACKEND

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for new in BACKEND.emit(graph, Path(tmp)):
            old = out_dir / new.name
            if not old.is_file() or old.read_bytes() != new.read_bytes():
                shutil.copyfile(new, old)
    library = BACKEND.build(out_dir, cflags=cflags, target="libmodel.so")
    loaded = out_dir / f".libmodel.{hashlib.sha256(library.read_bytes()).hexdigest()[:16]}.so"
    if not loaded.is_file():
        shutil.copyfile(library, loaded)
    return CModel(loaded.resolve(), graph.config.vocab_size, graph.config.n_ctx)
