"""Graph.verify catches every inconsistency a pass could leave behind; the text form names every op."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph, current_rows
from crystalc.ir.ops import LayerNorm
from crystalc.ir.tensor import Tensor
from crystalc.passes.quantize import quantize
from tests.conftest import random_graph


def _block0(g: Graph, **changes: object) -> Graph:
    return g.replace(blocks=(dataclasses.replace(g.blocks[0], **changes), *g.blocks[1:]))


def _ln(d: int) -> LayerNorm:
    return LayerNorm(Tensor("ln_f.weight", np.ones(d, np.float32)), Tensor("ln_f.bias", np.zeros(d, np.float32)))


BREAKS: dict[str, tuple[Callable[[Graph], Graph], str]] = {
    "a block too few": (lambda g: g.replace(blocks=g.blocks[:-1]), "config says 3"),
    "heads disagree": (lambda g: _block0(g, attn=dataclasses.replace(g.blocks[0].attn, n_heads=1)), "heads"),
    "field normalisation disagrees": (
        lambda g: _block0(g, field=dataclasses.replace(g.blocks[0].field, normalize=False)), "normalisation"),
    "final norm missing": (lambda g: g.replace(final_norm=None), "ln_f"),
    "head tying disagrees": (lambda g: g.replace(head=dataclasses.replace(g.head, tied=True)), "tie_head"),
    "vocab_map of the wrong length": (
        lambda g: g.replace(vocab_map=np.arange(3, dtype=np.int64), orig_vocab_size=40), "vocab_map: shape"),
    "vocab_map not increasing": (
        lambda g: g.replace(vocab_map=np.arange(19, dtype=np.int64)[::-1].copy(), orig_vocab_size=40),
        "strictly increasing"),
    "vocab_map past the original vocabulary": (
        lambda g: g.replace(vocab_map=np.arange(19, dtype=np.int64) + 5, orig_vocab_size=20), "strictly increasing"),
    "original vocabulary smaller than the current": (
        lambda g: g.replace(vocab_map=np.arange(19, dtype=np.int64), orig_vocab_size=10), "smaller"),
    # found by an audit: these passed verify and failed (or computed otherwise) further on
    "original vocabulary larger, with no vocab_map": (lambda g: g.replace(orig_vocab_size=40), "no vocab_map"),
    "original vocabulary not an integer": (
        lambda g: g.replace(vocab_map=np.arange(19, dtype=np.int64), orig_vocab_size=19.5), "must be an integer"),
    "two layer norms' tensors swapped": (
        lambda g: _block0(g, ln1=g.blocks[0].ln2, ln2=g.blocks[0].ln1),
        "blocks.0.ln1.weight: the tensor there is named 'blocks.0.ln2.weight'"),
    "an attention weight misnamed": (
        lambda g: _block0(g, attn=dataclasses.replace(
            g.blocks[0].attn, k_weight=Tensor("blocks.0.attn.q_proj.weight", g.blocks[0].attn.k_weight.data))),
        "blocks.0.attn.k_proj.weight: the tensor there is named 'blocks.0.attn.q_proj.weight'"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_verify_rejects(name: str) -> None:
    g = random_graph("three_blocks_n0_n1")
    g.verify()
    breaker, needle = BREAKS[name]
    with pytest.raises(CrystalError, match=needle):
        breaker(g).verify()


def test_verify_rejects_a_final_norm_the_config_lacks() -> None:
    g = random_graph("d40_h5")
    with pytest.raises(CrystalError, match="ln_f"):
        g.replace(final_norm=_ln(40)).verify()


def test_text_names_every_op_with_its_quantization_and_neurons() -> None:
    g = quantize(random_graph("three_blocks_n0_n1"), "int8", "group:4")
    text = g.text()
    paths = [p for p, _ in g.ops()]
    assert [line.split(" = ")[0][1:] for line in text.splitlines() if line.startswith("%")] == paths
    assert "weight=i8/group:4[19, 12]" in text
    assert "# 0 neurons: 0 frozen, 0 active" in text and "# 1 neuron: 0 frozen, 1 active" in text
    assert "# 5 neurons: 3 frozen, 2 active" in text
    assert text.endswith(f"parameters: {g.n_params:,}  bytes: {g.nbytes:,}\n")


def test_map_tensors_keeps_the_structure() -> None:
    g = random_graph("tied_unnormalised")
    doubled = g.map_tensors(lambda t: Tensor(t.name, t.data * 2) if t.dtype == "f32" else t).verify()
    assert [t.name for t in doubled.tensors()] == [t.name for t in g.tensors()]
    for a, b in zip(g.tensors(), doubled.tensors(), strict=True):
        np.testing.assert_array_equal(b.data, a.data * 2 if a.dtype == "f32" else a.data)


def test_tensor_arrays_cannot_be_written_through_the_ir() -> None:
    # graphs share arrays between passes: a write through one graph would change another
    g = quantize(random_graph("all_on"), "mixed8", "row")
    source = np.zeros(3, np.float32)
    t = Tensor("t", source)
    for tensor in (*g.tensors(), t):
        arrays = [tensor.data] + ([tensor.quant.scale, tensor.quant.offset] if tensor.quant else [])
        for arr in arrays:
            with pytest.raises(ValueError, match="read-only"):
                arr.reshape(-1)[0] = 0
    source[0] = 1  # the caller's own array stays writable: the tensor holds a view
    from crystalc.passes.prune_vocab import prune_vocab

    kept = prune_vocab(g, None, [0, 3, 4])
    with pytest.raises(ValueError, match="read-only"):
        kept.vocab_map[0] = 1


def test_current_rows_names_what_is_wrong_with_an_id() -> None:
    assert current_rows([9, 0, 4], [0, 4, 9], 12) == [2, 0, 1]
    for ids, n_orig, why in (([12], 12, "token id 12 is outside the vocabulary 0..11"),
                             ([-1], 12, "token id -1 is outside the vocabulary 0..11"),
                             ([5], 12, "token id 5 was pruned from this model's vocabulary"),
                             ([5], None, r"token id 5 is not in this model's vocabulary \(pruned\)")):
        with pytest.raises(CrystalError, match=why):
            current_rows(ids, [0, 4, 9], n_orig)


def test_known_rows_skips_what_a_pruned_vocabulary_lacks() -> None:
    from crystalc.passes.prune_vocab import prune_vocab

    g = prune_vocab(random_graph("d40_h5", seed=2), None, [0, 3, 4, 9])
    rows, dropped = g.known_rows([9, 1, 0, 9, 5, 4])
    assert rows.tolist() == [3, 0, 3, 2] and dropped == 2
    assert g.known_rows([])[0].size == 0


@pytest.mark.parametrize(("scheme", "group", "offset", "needle"), [
    ("row", 0, 0.5, "nonzero offsets under the symmetric row scheme"),
    ("group", 4, 0.5, "nonzero offsets under the symmetric group scheme"),
    ("group", 2.5, 0.0, "group >= 1"),  # once an IndexError out of dequantize
    ("group", True, 0.0, "group >= 1"),
])
def test_verify_rejects_quantization_parameters_no_consumer_reads(scheme, group, offset, needle) -> None:
    from crystalc.ir.tensor import Quant

    g = random_graph("d40_h5")
    w = g.token_embed.weight.data
    rows, cols = w.shape
    shape = (rows,) if scheme == "row" else (rows, -(-cols // int(group)))
    q = Quant(scheme, np.ones(shape, np.float32), np.full(shape, offset, np.float32), group)
    coded = Tensor("token_embed.weight", np.zeros(w.shape, np.int8), q)
    with pytest.raises(CrystalError, match=needle):
        g.replace(token_embed=dataclasses.replace(g.token_embed, weight=coded)).verify()
