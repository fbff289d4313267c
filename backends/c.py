"""The C backend: a graph becomes portable C99 plus one binary blob of weights.

Decisions taken here (the templates in templates/c/ only render text):

- Weights go into `weights.bin`, linked into the program's read-only data by an
  assembler `.incbin` (`weights.S`), never printed as C literals: hex arrays cost
  2.4-5 bytes of source per weight byte and slow the compiler down, a blob costs 1
  and the compiler never parses it (docs/backends.md). Every array starts on a
  64-byte boundary, little-endian; the program checks the byte order at start-up.
- `model.c` fills the `crystal_model` of crystal.h with pointers into the blob;
  the forward pass and the command line are the shared crystal_forward.c and
  crystal_cli.c that the portable runtime also runs.
- Frozen neurons are `static const` data: the whole model is constant, and the
  frozen mask of each block is a `static const` C array with its counts in a comment.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crystalc.backends.tools import run_tool
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.ops import LayerNorm
from crystalc.ir.tensor import Tensor
from crystalc.templating import copy_template, render
from crystalc.tokenizer import byte_level_bpe

ALIGN = 64
BLOB_MAGIC = 0x57595243  # "CRYW" read as a little-endian uint32: the start-up byte-order check
DEFAULT_CFLAGS = "-O3 -march=native"
# CFLAGS the C and CUDA Makefiles refuse: -ffast-math and its parts reassociate and approximate the float
# arithmetic the outputs are checked against (fast_exp's rounding constant alone then moves logits by 0.1)
# and drop NaN checks
UNSAFE_CFLAGS = ("-Ofast", "-ffast-math", "-funsafe-math-optimizations", "-fassociative-math", "-freciprocal-math",
                 "-ffinite-math-only")
SHARED_FILES = ("crystal.h", "unicode_classes.h", "crystal_forward.c", "crystal_cli.c")
DTYPE_ENUM = {"f32": "CRYSTAL_F32", "i8": "CRYSTAL_I8", "i16": "CRYSTAL_I16"}
LITTLE = {"f32": "<f4", "i8": "i1", "i16": "<i2"}
SCHEME_ENUM = {None: "CRYSTAL_Q_NONE", "tensor": "CRYSTAL_Q_TENSOR", "row": "CRYSTAL_Q_ROW", "group": "CRYSTAL_Q_GROUP"}
TOKENIZER_ENUM = {None: "CRYSTAL_TOK_NONE", "char": "CRYSTAL_TOK_CHAR", "bpe": "CRYSTAL_TOK_BPE"}


@dataclass
class Blob:
    """The weights file being laid out: aligned arrays appended in graph order."""

    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    table: list[tuple[str, int, int]] = field(default_factory=list)  # (what, offset, bytes) for the listing

    def add(self, what: str, data: bytes) -> int:
        pad = -self.size % ALIGN
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        off = self.size
        self.parts.append(data)
        self.size += len(data)
        self.table.append((what, off, len(data)))
        return off

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _tensor(blob: Blob, t: Tensor) -> dict[str, Any]:
    """A crystal_tensor initializer's fields for tensor `t`, its arrays appended to the blob."""
    shape = t.shape
    rows, cols = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    q = t.quant
    desc = {
        "name": t.name, "dtype": DTYPE_ENUM[t.dtype], "scheme": SCHEME_ENUM[q.scheme if q else None],
        # a group wider than the row is the row (as the runtime reads it); and it keeps crystal.h's
        # int arithmetic (cols + group - 1) from overflowing for groups near 2^31
        "rows": rows, "cols": cols, "group": min(q.group, max(cols, 1)) if q and q.scheme == "group" else 0,
        "data": blob.add(t.name, np.ascontiguousarray(t.data, dtype=LITTLE[t.dtype]).tobytes()),
        "scale": None, "offset": None,
        "shape": "x".join(map(str, shape)) or "0", "kind": t.dtype + (f"/{q.scheme}" if q else ""),
    }
    if q is not None:
        desc["scale"] = blob.add(t.name + " scale", np.ascontiguousarray(q.scale, dtype="<f4").tobytes())
        # the symmetric schemes' offsets are 0 by definition: NULL in crystal.h, no bytes here
        if q.scheme == "tensor" or np.any(np.asarray(q.offset) != 0):
            desc["offset"] = blob.add(t.name + " offset", np.ascontiguousarray(q.offset, dtype="<f4").tobytes())
    return desc


HEAD_TILE = 128  # CRYSTAL_HEAD_TILE of crystal.h: model.c checks the two agree when it compiles


def _head_tiles(blob: Blob, t: Tensor) -> tuple[dict[str, Any], int]:
    """An untied float32 head stored only as the forward pass packs it (tiles of HEAD_TILE rows,
    each transposed): the program then starts without copying 6 MB (the seeds' size) into
    a second layout. Returns the tensor's fields (no data) and the tiles' offset."""
    w = np.asarray(t.data, dtype=np.float32)
    v, d = w.shape
    padded = np.zeros((-(-v // HEAD_TILE) * HEAD_TILE, d), dtype=np.float32)
    padded[:v] = w
    tiles = padded.reshape(-1, HEAD_TILE, d).transpose(0, 2, 1)
    desc = {"name": t.name, "dtype": DTYPE_ENUM["f32"], "scheme": SCHEME_ENUM[None], "rows": v, "cols": d,
            "group": 0, "data": None, "scale": None, "offset": None, "shape": f"{v}x{d}",
            "kind": "f32, stored as the head tiles below"}
    return desc, blob.add(t.name + " (tiles)", np.ascontiguousarray(tiles, dtype="<f4").tobytes())


def _layer_norm(blob: Blob, ln: LayerNorm) -> dict[str, Any]:
    return {"weight": _tensor(blob, ln.weight), "bias": _tensor(blob, ln.bias)}


def _c_float(x: float) -> str:
    """A float literal that parses to exactly float32(x): the shortest digits that round-trip, positional
    from 1e-4 to 1e6 (as numpy prints a float32), else scientific. numpy's format functions, not str():
    str() follows the process's print options, which a library may have changed (legacy ones round)."""
    v = np.float32(x)
    if v == 0 or np.float32(1e-4) <= abs(v) < np.float32(1e6):
        return np.format_float_positional(v, unique=True, trim="0") + "f"
    return np.format_float_scientific(v, unique=True, trim="-", exp_digits=2) + "f"


def lower(graph: Graph, *, head_tiles: bool = True) -> tuple[dict[str, Any], bytes]:
    """The template context and the weights blob of `graph`.

    `head_tiles`: an untied float32 head is stored as crystal_forward.c's tiles (`_head_tiles`);
    False stores it as every other tensor, plain [V, D] (the CUDA forward pass reads it so)."""
    c = graph.config
    blob = Blob()
    blob.add("magic", np.array([BLOB_MAGIC], dtype="<u4").tobytes())
    ctx: dict[str, Any] = {
        "config": c, "magic": f"0x{BLOB_MAGIC:08x}u",
        "ln_eps": _c_float(c.ln_eps), "field_eps": _c_float(c.field_eps),
        "token_embed": _tensor(blob, graph.token_embed.weight),
        "pos_embed": _tensor(blob, graph.pos_embed.weight),
        "blocks": [],
    }
    for b, blk in enumerate(graph.blocks):
        f = blk.field
        frozen = [int(x) for x in np.asarray(f.frozen.data, dtype=bool)]
        a = blk.attn
        ctx["blocks"].append({
            "index": b,
            "ln1": _layer_norm(blob, blk.ln1),
            "attn": {k: _tensor(blob, getattr(a, k)) for k in (
                "q_weight", "q_bias", "k_weight", "k_bias", "v_weight", "v_bias", "out_weight", "out_bias")},
            "ln2": _layer_norm(blob, blk.ln2),
            "field": {
                "n_neurons": f.n_neurons, "n_frozen": sum(frozen), "n_active": f.n_neurons - sum(frozen),
                "frozen": frozen,
                "positions": _tensor(blob, f.positions), "values": _tensor(blob, f.values),
                "temperature": _tensor(blob, f.temperature),
            },
            "ln3": _layer_norm(blob, blk.ln3),
            "ffn": {k: _tensor(blob, getattr(blk.ffn, k)) for k in (
                "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")},
        })
    ctx["ln_f"] = _layer_norm(blob, graph.final_norm) if graph.final_norm is not None else None
    ctx["head_tiles"] = None
    if graph.head.weight is None:
        ctx["head_weight"] = ctx["token_embed"]
    elif head_tiles and graph.head.weight.dtype == "f32":
        ctx["head_weight"], ctx["head_tiles"] = _head_tiles(blob, graph.head.weight)
    else:
        ctx["head_weight"] = _tensor(blob, graph.head.weight)
    ctx["head_bias"] = _tensor(blob, graph.head.bias)

    orig = graph.original_vocab_size
    ctx["orig_vocab_size"] = orig
    ctx["vocab_map"] = None
    if graph.vocab_map is not None:
        ctx["vocab_map"] = blob.add("vocab_map", np.asarray(graph.vocab_map, dtype="<i4").tobytes())

    tok = graph.tokenizer or {}
    kind = tok.get("kind")
    ctx["tokenizer"] = TOKENIZER_ENUM.get(kind, "CRYSTAL_TOK_OTHER")
    ctx["tokenizer_kind"] = kind or "none"
    ctx["chars"] = ctx["char_offsets"] = ctx["bpe_byte_ids"] = ctx["bpe_merges"] = None
    ctx["bpe_n_merges"], ctx["tokenizer_note"] = 0, ""
    pieces: list[bytes] | None = None
    if kind == "char":
        pieces = [ch.encode("utf-8") for ch in tok["chars"]]  # one per original id: Graph.verify checked
    elif kind == "hf-tokenizers":
        try:
            bpe = byte_level_bpe(tok["json"])
        except CrystalError as e:  # the program takes --prompt-ids only, and says why in model.c
            ctx["tokenizer_note"] = f"no --prompt: {e}".replace("*/", "*\\/")  # inside a C comment
        else:
            if len(bpe.token_bytes) != orig:
                raise CrystalError(f"tokenizer: {len(bpe.token_bytes)} tokens for a vocabulary of {orig} ids")
            ctx["tokenizer"], ctx["tokenizer_kind"] = TOKENIZER_ENUM["bpe"], "byte-level BPE"
            pieces = list(bpe.token_bytes)
            ctx["bpe_byte_ids"] = blob.add("tokenizer byte ids", np.asarray(bpe.byte_ids, dtype="<i4").tobytes())
            table = bpe.merge_table()
            ctx["bpe_n_merges"] = len(table)
            if len(table):
                ctx["bpe_merges"] = blob.add("tokenizer merges", table.tobytes())
    if pieces is not None:
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in pieces])]).astype("<u4")
        ctx["chars"] = blob.add("tokenizer chars", b"".join(pieces))
        ctx["char_offsets"] = blob.add("tokenizer char offsets", offsets.tobytes())
    ctx["head_tile"] = HEAD_TILE
    ctx["blob_size"] = blob.size
    ctx["blob_table"] = blob.table
    ctx["summary"] = c.summary()
    return ctx, blob.bytes()


class CBackend:
    name = "c"

    def emit(self, graph: Graph, out_dir: Path) -> list[Path]:
        """Write model.h, model.c, main.c, weights.S, weights.bin, Makefile and the shared C into out_dir.

        No options: a name given by mistake is a TypeError, not silently ignored."""
        graph.verify()
        out_dir = Path(out_dir)
        ctx, blob = lower(graph)
        written = []
        for template, name in (("model.h.j2", "model.h"), ("model.c.j2", "model.c"), ("main.c.j2", "main.c"),
                               ("weights.S.j2", "weights.S"), ("Makefile.j2", "Makefile")):
            path = out_dir / name
            path.write_text(render("c", template, **ctx, default_cflags=DEFAULT_CFLAGS,
                                   unsafe_cflags=" ".join(UNSAFE_CFLAGS), forward_source="crystal_forward.c"),
                            encoding="utf-8")
            written.append(path)
        (out_dir / "weights.bin").write_bytes(blob)
        written.append(out_dir / "weights.bin")
        written += [copy_template("c", name, out_dir) for name in SHARED_FILES]
        return written

    def build(self, out_dir: Path, *, cflags: str | None = None, target: str = "model") -> Path:
        """Run `make` in out_dir; `cflags` replace the Makefile's CFLAGS (None: its default); `target` is
        "model" (the program) or "libmodel.so" (for the cffi binding)."""
        cc = shlex.split(os.environ.get("CC", "cc") or "cc")[0]
        cmd = ["make", "-s", "-C", str(out_dir), target]
        if cflags is not None:
            cmd.append(f"CFLAGS={cflags}")
        run_tool(cmd, ("make", cc), "building the C model")
        return Path(out_dir) / target


BACKEND = CBackend()
