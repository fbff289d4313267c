"""Reading the seeds' own .crystal files (format version 2), for reading and running.

Their layout (docs/crystal-format.md, "Version 2") is a 64-byte header of
dimensions and absolute section offsets, then raw little-endian arrays of one
single-block model with the spec's defaults. Everything is float32 except, under
MIXED8, the head: per-tensor int8 codes with the seeds' scale and offset, which is
the IR's "tensor" quantization scheme exactly. The files carry no tokenizer, no
vocabulary map (a pruned file's ids are its own rows) and no frozen mask (only
the count, kept in the graph's meta).
"""

from __future__ import annotations

import struct

import numpy as np

from crystalc.config import MAX_DIM, ModelConfig
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph, build_graph
from crystalc.ir.tensor import Quant, Tensor

HEADER = struct.Struct("<IHHI10H8I")
assert HEADER.size == 64

PRUNED_VOCAB = 0x0004
FLOAT32 = 0x0008
MIXED8 = 0x0040
CAUSAL = 0x0080
KNOWN_FLAGS = PRUNED_VOCAB | FLOAT32 | MIXED8 | CAUSAL
SECTIONS = ("embed", "pos", "causal", "geo", "ffn", "head", "norm")


def section_sizes(v: int, d: int, t: int, f: int, n: int, mixed8: bool) -> dict[str, int]:
    """Bytes of each section for these dimensions."""
    head = 16 + v * d + v if mixed8 else 4 * (v * d + v)
    return {"embed": 4 * v * d, "pos": 4 * t * d, "causal": 4 * 4 * (d * d + d), "geo": 4 * (2 * n * d + n),
            "ffn": 4 * (2 * f * d + f + d), "head": head, "norm": 4 * 6 * d}


def decode_seeds_v2(data: bytes) -> Graph:
    if len(data) < HEADER.size:
        raise CrystalError(f"file is {len(data)} bytes, too short for a version-2 .crystal header")
    (_, _, flags, v, d, t, f, n, n_frozen, n_active, h, n_norms, _, _, *offsets) = HEADER.unpack_from(data, 0)
    total = offsets[-1]
    if flags & ~KNOWN_FLAGS:
        raise CrystalError(f"version-2 header: unsupported flag bits 0x{flags & ~KNOWN_FLAGS:04x}")
    if not flags & CAUSAL:
        raise CrystalError("version-2 header: not a causal model (the CAUSAL flag is missing)")
    if bool(flags & FLOAT32) == bool(flags & MIXED8):
        raise CrystalError("version-2 header: exactly one of FLOAT32 and MIXED8 must be set")
    for what, val in (("vocab_size", v), ("embed_dim", d), ("context_len", t), ("hidden_dim", f),
                      ("num_heads", h)):
        if not 1 <= val <= MAX_DIM:
            raise CrystalError(f"version-2 header: {what} = {val} is outside 1..{MAX_DIM}")
    if d % h:
        raise CrystalError(f"version-2 header: embed_dim {d} is not divisible by num_heads {h}")
    if n_frozen + n_active != n:
        raise CrystalError(f"version-2 header: {n_frozen} frozen + {n_active} active != {n} neurons")
    if n_norms != 3:
        raise CrystalError(f"version-2 header: {n_norms} norms, expected 3")
    if total != len(data):
        raise CrystalError(f"version-2 header: total size {total} but the file is {len(data)} bytes")
    sizes = section_sizes(v, d, t, f, n, bool(flags & MIXED8))
    spans = []
    for name, off in zip(SECTIONS, offsets[:7], strict=True):
        end = off + sizes[name]
        if off < HEADER.size or end > total:
            raise CrystalError(f"version-2 section {name}: bytes {off}..{end} lie outside 64..{total}")
        if end > off:  # an empty section (no neurons) has no bytes to share with another
            spans.append((off, end, name))
    spans.sort()
    for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:], strict=False):
        if start_b < end_a:
            raise CrystalError(f"version-2 sections {a} and {b} overlap")
    try:
        config = ModelConfig(vocab_size=v, d_model=d, n_ctx=t, n_heads=h, n_neurons=(n,), ffn_hidden=f)
    except (TypeError, ValueError) as e:
        raise CrystalError(f"version-2 header: {e}") from None
    config.validate()
    off = dict(zip(SECTIONS, offsets[:7], strict=True))

    params: dict[str, Tensor] = {}
    cursor = 0

    def take(name: str, shape: tuple[int, ...], dtype: str = "<f4") -> np.ndarray:
        nonlocal cursor
        count = int(np.prod(shape))
        a = np.frombuffer(data, dtype=dtype, count=count, offset=cursor).reshape(shape)
        cursor += a.nbytes
        out = a.astype(np.float32 if dtype == "<f4" else np.int8)
        if name:
            params[name] = Tensor(name, out)
        return out

    cursor = off["embed"]
    take("token_embed.weight", (v, d))
    cursor = off["pos"]
    take("pos_embed.weight", (t, d))
    cursor = off["causal"]
    for proj in ("q", "k", "v", "out"):
        take(f"blocks.0.attn.{proj}_proj.weight", (d, d))
        take(f"blocks.0.attn.{proj}_proj.bias", (d,))
    cursor = off["geo"]
    take("blocks.0.field.positions", (n, d))
    take("blocks.0.field.values", (n, d))
    take("blocks.0.field.temperature", (n,))
    params["blocks.0.field.frozen"] = Tensor("blocks.0.field.frozen", np.zeros(n, dtype=bool))
    cursor = off["ffn"]
    take("blocks.0.ffn.fc1.weight", (f, d))
    take("blocks.0.ffn.fc1.bias", (f,))
    take("blocks.0.ffn.fc2.weight", (d, f))
    take("blocks.0.ffn.fc2.bias", (d,))
    cursor = off["head"]
    if flags & MIXED8:
        w_scale, w_off, b_scale, b_off = take("", (4,))
        head = (("head.weight", (v, d), w_scale, w_off), ("head.bias", (v,), b_scale, b_off))
        for name, shape, scale, offset in head:
            codes = take("", shape, "i1")
            q = Quant("tensor", np.array([scale], np.float32), np.array([offset], np.float32))
            params[name] = Tensor(name, codes, q)
    else:
        take("head.weight", (v, d))
        take("head.bias", (v,))
    cursor = off["norm"]
    for ln in ("ln1", "ln2", "ln3"):  # the seeds' norm_causal, norm_geo, norm_ffn
        take(f"blocks.0.{ln}.weight", (d,))
        take(f"blocks.0.{ln}.bias", (d,))
    meta = {"source": "seeds .crystal version 2", "num_frozen": n_frozen, "pruned_vocab": bool(flags & PRUNED_VOCAB)}
    return build_graph(config, params, None, meta=meta)
