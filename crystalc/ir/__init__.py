"""The crystal IR: typed tensors, typed ops, a graph with verify(), and its interpreter."""

from crystalc.ir.graph import Block, Graph
from crystalc.ir.ops import (
    FFN,
    CausalSelfAttention,
    Embedding,
    Head,
    LayerNorm,
    NeuronField,
    PositionEmbedding,
)
from crystalc.ir.tensor import Quant, Tensor

__all__ = [
    "FFN", "Block", "CausalSelfAttention", "Embedding", "Graph", "Head", "LayerNorm",
    "NeuronField", "PositionEmbedding", "Quant", "Tensor",
]
