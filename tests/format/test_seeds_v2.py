"""The seeds' version-2 .crystal files: read, interpreted, and checked against torch on the same weights."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.format.crystal import read_crystal
from crystalc.ir.interpret import forward
from tests.conftest import random_graph, random_state, require_module
from tests.format.seeds_v2_writer import seeds_int8, seeds_v2_bytes

SHAPE = dict(vocab_size=29, d_model=24, n_ctx=10, n_heads=3, n_blocks=1, n_neurons=6, ffn_hidden=48)


def torch_logits(sd: dict[str, np.ndarray], ids: list[int]) -> np.ndarray:
    torch = require_module("torch")
    from crystalc.config import ModelConfig
    from crystalc.model import CrystalLM

    model = CrystalLM(ModelConfig.from_dict(SHAPE))
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in sd.items()}, strict=True)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def state() -> dict[str, np.ndarray]:
    g = random_graph(SHAPE, seed=11)
    return random_state(g.config, 11)


@pytest.mark.parametrize("order,gap", [(None, 0), (("norm", "head", "geo", "embed", "ffn", "pos", "causal"), 3)])
def test_float32_file_matches_torch(tmp_path, order, gap):
    sd = state()
    path = tmp_path / "seeds.crystal"
    path.write_bytes(seeds_v2_bytes(sd, n_heads=3, n_frozen=4, order=order, gap=gap))
    g = read_crystal(path)
    assert g.config.vocab_size == 29 and g.config.n_heads == 3 and g.config.n_neurons == (6,)
    assert g.meta["num_frozen"] == 4 and g.tokenizer is None and g.vocab_map is None
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    ref = dict(sd, **{"blocks.0.field.frozen": np.zeros(6, bool)})  # v2 files keep no frozen mask
    np.testing.assert_allclose(forward(g, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)


def test_mixed8_head_is_dequantized_as_the_seeds_did(tmp_path):
    sd = state()
    path = tmp_path / "seeds8.crystal"
    path.write_bytes(seeds_v2_bytes(sd, n_heads=3, mixed8=True, pruned=True))
    g = read_crystal(path)
    assert g.head.weight.dtype == "i8" and g.head.weight.quant.scheme == "tensor"
    assert g.meta["pruned_vocab"] is True
    ref = dict(sd)
    for name in ("head.weight", "head.bias"):  # q * scale + offset, in float32, computed here independently
        q, scale, offset = seeds_int8(sd[name])
        ref[name] = (q.astype(np.float32) * scale + offset).astype(np.float32)
    ref["blocks.0.field.frozen"] = np.zeros(6, bool)
    ids = [0, 28, 7]
    np.testing.assert_allclose(forward(g, ids), torch_logits(ref, ids), atol=1e-4, rtol=0)


def _patch(data: bytes, fmt: str, offset: int, value: int) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d[:-1], "total size"),
    (lambda d: _patch(d, "<H", 6, 0x0080), "exactly one of FLOAT32 and MIXED8"),
    (lambda d: _patch(d, "<H", 6, 0x0008), "CAUSAL"),
    (lambda d: _patch(d, "<H", 6, 0x0088 | 0x0010), "unsupported flag"),
    (lambda d: _patch(d, "<I", 8, 0), "vocab_size"),
    (lambda d: _patch(d, "<I", 8, 0xFFFFFFFF), "vocab_size"),
    (lambda d: _patch(d, "<H", 12, 0xFFFF), "section embed"),
    (lambda d: _patch(d, "<H", 12, 0), "embed_dim"),
    (lambda d: _patch(d, "<H", 24, 5), "divisible"),
    (lambda d: _patch(d, "<H", 20, 1), "frozen"),
    (lambda d: _patch(d, "<H", 26, 2), "norms"),
    (lambda d: _patch(d, "<I", 32 + 4 * 5, 0xFFFFFF00), "head"),
    (lambda d: _patch(d, "<I", 32 + 4 * 1, 70), "overlap"),
    (lambda d: _patch(d, "<I", 32, 10), "embed"),
])
def test_malformed_v2_files_are_one_line_errors(tmp_path, mutate, message):
    path = tmp_path / "bad.crystal"
    path.write_bytes(mutate(seeds_v2_bytes(state(), n_heads=3)))
    with pytest.raises(CrystalError, match=message) as e:
        read_crystal(path)
    assert "\n" not in str(e.value)
