"""A small writer of the seeds' version-2 .crystal files, following the layout in issue 3 / docs/crystal-format.md.

It is written from the layout description, not from crystalc's reader, so the
tests that use it check the reader against the format rather than against itself.
"""

from __future__ import annotations

import struct

import numpy as np

PRUNED_VOCAB, FLOAT32, MIXED8, CAUSAL = 0x0004, 0x0008, 0x0040, 0x0080


def seeds_int8(x: np.ndarray) -> tuple[np.ndarray, np.float32, np.float32]:
    """The int8 twin of the seeds' quantize_array_int16: per-tensor min/max scale and offset."""
    x = x.astype(np.float32)
    vmin, vmax = x.min(), x.max()
    scale = np.float32((vmax - vmin) / np.float32(254.0))
    offset = np.float32(vmin + np.float32(127) * scale)
    return np.clip(np.round((x - offset) / scale), -127, 127).astype(np.int8), scale, offset


def seeds_v2_bytes(sd: dict[str, np.ndarray], n_heads: int, mixed8: bool = False, pruned: bool = False,
                   n_frozen: int = 0, order: tuple[str, ...] | None = None, gap: int = 0) -> bytes:
    """A version-2 file of a canonical one-block state_dict; `order`/`gap` place sections oddly on purpose."""
    f32 = lambda *names: b"".join(np.ascontiguousarray(sd[n], dtype="<f4").tobytes() for n in names)  # noqa: E731
    b = "blocks.0"
    v, d = sd["token_embed.weight"].shape
    t = sd["pos_embed.weight"].shape[0]
    hid = sd[f"{b}.ffn.fc1.weight"].shape[0]
    n = sd[f"{b}.field.positions"].shape[0]
    if mixed8:
        wq, ws, wo = seeds_int8(sd["head.weight"])
        bq, bs, bo = seeds_int8(sd["head.bias"])
        head = np.array([ws, wo, bs, bo], dtype="<f4").tobytes() + wq.tobytes() + bq.tobytes()
    else:
        head = f32("head.weight", "head.bias")
    sections = {
        "embed": f32("token_embed.weight"),
        "pos": f32("pos_embed.weight"),
        "causal": f32(*[f"{b}.attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")],
                      f"{b}.attn.out_proj.weight", f"{b}.attn.out_proj.bias"),
        "geo": f32(f"{b}.field.positions", f"{b}.field.values", f"{b}.field.temperature"),
        "ffn": f32(f"{b}.ffn.fc1.weight", f"{b}.ffn.fc1.bias", f"{b}.ffn.fc2.weight", f"{b}.ffn.fc2.bias"),
        "head": head,
        "norm": f32(*[f"{b}.{ln}.{w}" for ln in ("ln1", "ln2", "ln3") for w in ("weight", "bias")]),
    }
    names = ("embed", "pos", "causal", "geo", "ffn", "head", "norm")
    body = bytearray(64)
    offsets = {}
    for name in order or names:
        body += b"\xee" * gap
        offsets[name] = len(body)
        body += sections[name]
    flags = CAUSAL | (MIXED8 if mixed8 else FLOAT32) | (PRUNED_VOCAB if pruned else 0)
    body[:64] = struct.pack("<IHHI10H8I", 0x53595243, 2, flags, v, d, t, hid, n, n_frozen, n - n_frozen, n_heads, 3,
                            0, 0, *[offsets[k] for k in names], len(body))
    return bytes(body)
