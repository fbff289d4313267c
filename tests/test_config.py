"""ModelConfig.validate at its limits: every dimension in 1..MAX_DIM (neurons 0..MAX_DIM), no tensor over
MAX_ELEMENTS, checked before anything is allocated."""

from __future__ import annotations

from typing import Any

import pytest

from crystalc.config import MAX_DIM, MAX_ELEMENTS, ModelConfig
from crystalc.errors import CrystalError

SMALL: dict[str, Any] = dict(vocab_size=8, d_model=4, n_ctx=4, n_heads=1, n_blocks=1, n_neurons=[2], ffn_hidden=4)


@pytest.mark.parametrize("key", ["vocab_size", "n_ctx", "ffn_hidden", "n_neurons"])
def test_each_dimension_up_to_max_dim(key: str) -> None:
    at = MAX_DIM if key != "n_neurons" else [MAX_DIM]
    past = MAX_DIM + 1 if key != "n_neurons" else [MAX_DIM + 1]
    ModelConfig.from_dict(dict(SMALL, **{key: at})).validate()  # 2^20 x 4 elements: allowed
    with pytest.raises(CrystalError, match="outside"):
        ModelConfig.from_dict(dict(SMALL, **{key: past})).validate()


def test_at_least_one_of_everything_but_neurons() -> None:
    ModelConfig.from_dict(dict(SMALL, n_neurons=[0])).validate()
    for key in ("vocab_size", "d_model", "n_ctx", "n_heads", "ffn_hidden"):
        with pytest.raises(CrystalError, match="outside"):
            ModelConfig.from_dict(dict(SMALL, **{key: 0})).validate()


def test_a_tensor_over_max_elements() -> None:
    side = 1 << 16  # 2^16 x 2^16 = 2^32 > MAX_ELEMENTS, though each side is far below MAX_DIM
    assert side * side > MAX_ELEMENTS
    with pytest.raises(CrystalError, match="token_embed would hold"):
        ModelConfig.from_dict(dict(SMALL, vocab_size=side, d_model=side)).validate()


def test_the_spec_defaults_built_directly_and_from_a_dict() -> None:
    # F = 2*D and 64 neurons in every block, whichever way the config is made
    for cfg in (ModelConfig(vocab_size=8, d_model=40, n_heads=5, n_blocks=3),
                ModelConfig.from_dict(dict(vocab_size=8, d_model=40, n_heads=5, n_blocks=3))):
        cfg.validate()
        assert cfg.ffn_hidden == 80 and cfg.n_neurons == (64, 64, 64)
    assert ModelConfig(vocab_size=8).ffn_hidden == 256  # D = 128 by default


def test_an_explicit_none_is_not_a_default() -> None:
    for key in ("ffn_hidden", "n_neurons"):
        with pytest.raises(CrystalError, match=f"{key} must be an integer"):
            ModelConfig.from_dict(dict(SMALL, **{key: None}))
