"""The ops of the crystal IR.

Each op's `kind` is its name through every layer of the toolchain: the
interpreter function, the C function, the CUDA kernel, the Verilog core's opcode
(one core runs every op: OP_NEURON_FIELD, ...) and the SPICE subcircuit all carry
it, so one search follows an op everywhere. position_embedding is computed fused
with token_embedding, under both names.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

from crystalc.errors import CrystalError
from crystalc.ir.tensor import Tensor

WEIGHT_DTYPES = ("f32", "i8", "i16")


@dataclass(frozen=True)
class Op:
    kind: ClassVar[str] = "op"

    def tensors(self) -> Iterator[Tensor]:
        for v in self.__dict__.values():
            if isinstance(v, Tensor):
                yield v


@dataclass(frozen=True)
class Embedding(Op):
    """x_s = E[t_s]; token ids index rows of the (possibly pruned) vocabulary."""

    kind: ClassVar[str] = "token_embedding"
    weight: Tensor  # [V, D]

    def verify(self, v: int, d: int) -> None:
        self.weight.verify((v, d), WEIGHT_DTYPES)


@dataclass(frozen=True)
class PositionEmbedding(Op):
    """x_s += P[s]."""

    kind: ClassVar[str] = "position_embedding"
    weight: Tensor  # [T, D]

    def verify(self, t: int, d: int) -> None:
        self.weight.verify((t, d), WEIGHT_DTYPES)


@dataclass(frozen=True)
class LayerNorm(Op):
    kind: ClassVar[str] = "layer_norm"
    weight: Tensor  # [D]
    bias: Tensor  # [D]

    def verify(self, d: int) -> None:
        self.weight.verify((d,), WEIGHT_DTYPES)
        self.bias.verify((d,), WEIGHT_DTYPES)


@dataclass(frozen=True)
class CausalSelfAttention(Op):
    kind: ClassVar[str] = "causal_attention"
    n_heads: int
    q_weight: Tensor  # [D, D] (out, in)
    q_bias: Tensor
    k_weight: Tensor
    k_bias: Tensor
    v_weight: Tensor
    v_bias: Tensor
    out_weight: Tensor
    out_bias: Tensor

    def verify(self, d: int) -> None:
        for w in (self.q_weight, self.k_weight, self.v_weight, self.out_weight):
            w.verify((d, d), WEIGHT_DTYPES)
        for b in (self.q_bias, self.k_bias, self.v_bias, self.out_bias):
            b.verify((d,), WEIGHT_DTYPES)


@dataclass(frozen=True)
class NeuronField(Op):
    """Neurons as points: x += sum_j w_sj * val_j, w from the distance to each point."""

    kind: ClassVar[str] = "neuron_field"
    positions: Tensor  # [N, D]
    values: Tensor  # [N, D]
    temperature: Tensor  # [N]
    frozen: Tensor  # [N] bool: crystallised neurons, constants to a compiler
    normalize: bool
    eps: float

    @property
    def n_neurons(self) -> int:
        return self.positions.shape[0]

    def verify(self, n: int, d: int) -> None:
        self.positions.verify((n, d), WEIGHT_DTYPES)
        self.values.verify((n, d), WEIGHT_DTYPES)
        self.temperature.verify((n,), WEIGHT_DTYPES)
        self.frozen.verify((n,), ("bool",))


@dataclass(frozen=True)
class FFN(Op):
    """x += fc2(GELU(fc1(h))), GELU in its exact erf form."""

    kind: ClassVar[str] = "ffn"
    fc1_weight: Tensor  # [F, D]
    fc1_bias: Tensor  # [F]
    fc2_weight: Tensor  # [D, F]
    fc2_bias: Tensor  # [D]

    def verify(self, d: int, f: int) -> None:
        self.fc1_weight.verify((f, d), WEIGHT_DTYPES)
        self.fc1_bias.verify((f,), WEIGHT_DTYPES)
        self.fc2_weight.verify((d, f), WEIGHT_DTYPES)
        self.fc2_bias.verify((d,), WEIGHT_DTYPES)


@dataclass(frozen=True)
class Head(Op):
    """logits = h W^T + b; W is the token embedding when `tied`."""

    kind: ClassVar[str] = "head"
    weight: Tensor | None  # [V, D], None when tied
    bias: Tensor  # [V]
    tied: bool

    def verify(self, v: int, d: int) -> None:
        if self.tied != (self.weight is None):
            raise CrystalError("head: a tied head has no weight of its own; an untied one needs one")
        if self.weight is not None:
            self.weight.verify((v, d), WEIGHT_DTYPES)
        self.bias.verify((v,), WEIGHT_DTYPES)
