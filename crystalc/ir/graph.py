"""The crystal graph: a model as an ordered list of typed ops, with verify() and a text form."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crystalc.config import ModelConfig
from crystalc.errors import CrystalError
from crystalc.ir.ops import (
    FFN,
    CausalSelfAttention,
    Embedding,
    Head,
    LayerNorm,
    NeuronField,
    Op,
    PositionEmbedding,
)
from crystalc.ir.tensor import Tensor, read_only
from crystalc.tokenizer import check_spec


def current_rows(original: Iterable[int], kept: Iterable[int], n_orig: int | None) -> list[int]:
    """Rows of the current vocabulary for ids of the original tokenizer, row i standing for kept[i]. n_orig
    None: the original vocabulary's size is unknown (a pruned model's compiled folder keeps only its rows),
    so a missing id may be pruned or out of range."""
    row_of = {int(o): i for i, o in enumerate(kept)}
    out = []
    for t in original:
        if t not in row_of:
            if n_orig is None:
                raise CrystalError(f"token id {t} is not in this model's vocabulary (pruned)")
            if not 0 <= t < n_orig:
                raise CrystalError(f"token id {t} is outside the vocabulary 0..{n_orig - 1}")
            raise CrystalError(f"token id {t} was pruned from this model's vocabulary")
        out.append(row_of[t])
    return out


@dataclass(frozen=True)
class Block:
    ln1: LayerNorm
    attn: CausalSelfAttention
    ln2: LayerNorm
    field: NeuronField
    ln3: LayerNorm
    ffn: FFN


@dataclass(frozen=True)
class Graph:
    """A whole model. `config.vocab_size` is the current (possibly pruned) vocabulary.

    `vocab_map[i]` is the original tokenizer id of current id i (None: identity);
    `orig_vocab_size` is the tokenizer's vocabulary before any pruning.
    """

    config: ModelConfig
    token_embed: Embedding
    pos_embed: PositionEmbedding
    blocks: tuple[Block, ...]
    final_norm: LayerNorm | None
    head: Head
    tokenizer: dict[str, Any] | None = None
    vocab_map: np.ndarray | None = None
    orig_vocab_size: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.vocab_map, np.ndarray):  # shared by the graphs passes make of this one, as tensors are
            object.__setattr__(self, "vocab_map", read_only(self.vocab_map))

    def replace(self, **changes: Any) -> Graph:
        return dataclasses.replace(self, **changes)

    # --- walking -------------------------------------------------------------------------
    def ops(self) -> Iterator[tuple[str, Op]]:
        """(path, op) in execution order; the path is the op's canonical parameter prefix."""
        yield "token_embed", self.token_embed
        yield "pos_embed", self.pos_embed
        for b, blk in enumerate(self.blocks):
            for name in ("ln1", "attn", "ln2", "field", "ln3", "ffn"):
                yield f"blocks.{b}.{name}", getattr(blk, name)
        if self.final_norm is not None:
            yield "ln_f", self.final_norm
        yield "head", self.head

    def tensors(self) -> Iterator[Tensor]:
        for _, op in self.ops():
            yield from op.tensors()

    def map_tensors(self, fn: Callable[[Tensor], Tensor]) -> Graph:
        """A copy with every tensor of every op replaced by fn(tensor); the caller verifies it."""

        def op(o: Op) -> Op:
            changes = {f.name: fn(v) for f in dataclasses.fields(o) if isinstance(v := getattr(o, f.name), Tensor)}
            return dataclasses.replace(o, **changes) if changes else o

        def block(b: Block) -> Block:
            ops: dict[str, Any] = {f.name: op(getattr(b, f.name)) for f in dataclasses.fields(b)}
            return dataclasses.replace(b, **ops)

        blocks = tuple(block(b) for b in self.blocks)
        return self.replace(
            token_embed=op(self.token_embed), pos_embed=op(self.pos_embed), blocks=blocks,
            final_norm=None if self.final_norm is None else op(self.final_norm), head=op(self.head),
        )

    @property
    def head_weight(self) -> Tensor:
        return self.token_embed.weight if self.head.weight is None else self.head.weight

    @property
    def n_params(self) -> int:
        return sum(int(t.data.size) for t in self.tensors() if t.dtype != "bool")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    @property
    def original_vocab_size(self) -> int:
        """The tokenizer's vocabulary, whose ids the command lines speak: before any pruning."""
        return self.orig_vocab_size or self.config.vocab_size

    def original_ids(self) -> np.ndarray:
        """Original tokenizer id of every current id."""
        if self.vocab_map is None:
            return np.arange(self.config.vocab_size, dtype=np.int64)
        return self.vocab_map

    def known_rows(self, original: Sequence[int]) -> tuple[np.ndarray, int]:
        """Current rows of the ids of `original` this vocabulary has, in order, and how many it lacked (a text's
        tokens a pruned model dropped: evaluation and calibration read on without them)."""
        lookup = np.full(max(self.orig_vocab_size or 0, self.config.vocab_size, max(original, default=0) + 1), -1)
        lookup[self.original_ids()] = np.arange(self.config.vocab_size)
        rows = lookup[np.asarray(original, dtype=np.int64)]
        kept = rows[rows >= 0]
        return kept, int(rows.size - kept.size)

    def to_current_ids(self, original: list[int]) -> list[int]:
        """Map ids of the original tokenizer to rows of the current vocabulary."""
        return current_rows(original, self.original_ids(), self.original_vocab_size)

    # --- checking ------------------------------------------------------------------------
    def verify(self) -> Graph:
        """Check every shape, dtype and cross-reference; returns self so passes can chain."""
        c = self.config
        c.validate()
        v, d, t = c.vocab_size, c.d_model, c.n_ctx
        self.token_embed.verify(v, d)
        self.pos_embed.verify(t, d)
        if len(self.blocks) != c.n_blocks:
            raise CrystalError(f"graph has {len(self.blocks)} blocks, config says {c.n_blocks}")
        for b, blk in enumerate(self.blocks):
            for ln in (blk.ln1, blk.ln2, blk.ln3):
                ln.verify(d)
            if blk.attn.n_heads != c.n_heads:
                raise CrystalError(f"blocks.{b}.attn: {blk.attn.n_heads} heads, config says {c.n_heads}")
            blk.attn.verify(d)
            blk.field.verify(c.n_neurons[b], d)
            if blk.field.normalize != c.field_norm or blk.field.eps != c.field_eps:
                raise CrystalError(f"blocks.{b}.field: normalisation disagrees with the config")
            blk.ffn.verify(d, c.ffn_hidden)
        if (self.final_norm is not None) != c.final_norm:
            raise CrystalError("ln_f: presence disagrees with config.final_norm")
        if self.final_norm is not None:
            self.final_norm.verify(d)
        if self.head.tied != c.tie_head:
            raise CrystalError("head: tying disagrees with config.tie_head")
        self.head.verify(v, d)
        n_orig = self.orig_vocab_size
        if n_orig is not None and (not isinstance(n_orig, (int, np.integer)) or isinstance(n_orig, bool)):
            raise CrystalError(f"orig_vocab_size must be an integer, got {n_orig!r}")
        if self.vocab_map is None and n_orig is not None and n_orig != v:
            raise CrystalError(f"orig_vocab_size {n_orig} differs from the vocabulary {v}, but no vocab_map says "
                               "which rows were kept")
        if self.vocab_map is not None:
            m = self.vocab_map
            if m.dtype != np.int64 or m.shape != (v,):
                raise CrystalError(f"vocab_map: shape {list(m.shape)} {m.dtype}, expected [{v}] int64")
            if n_orig is None or n_orig < v:
                raise CrystalError(f"vocab_map: original vocabulary {n_orig} smaller than the current {v}")
            if v and (m.min() < 0 or m.max() >= n_orig or np.any(np.diff(m) <= 0)):
                raise CrystalError("vocab_map: ids must be strictly increasing within the original vocabulary")
        if self.tokenizer is not None:
            check_spec(self.tokenizer, self.original_vocab_size)
        # the interpreter reads tensors where they sit, state_dict() and the .crystal writer by name
        for want, tensor in zip(tensor_names(c), self.tensors(), strict=True):
            if tensor.name != want:
                raise CrystalError(f"{want}: the tensor there is named {tensor.name!r}")
        return self

    # --- text form -----------------------------------------------------------------------
    def text(self) -> str:
        """A readable listing: one line per op with its tensors."""
        c = self.config
        lines = [
            f"crystal graph: V={c.vocab_size} D={c.d_model} T={c.n_ctx} H={c.n_heads} "
            f"L={c.n_blocks} F={c.ffn_hidden} field_norm={c.field_norm} final_norm={c.final_norm} "
            f"tie_head={c.tie_head}"
        ]
        if self.vocab_map is not None:
            lines.append(f"pruned vocabulary: {c.vocab_size} of {self.orig_vocab_size} ids kept")
        for path, op in self.ops():
            parts = []
            for f in dataclasses.fields(op):
                val = getattr(op, f.name)
                if isinstance(val, Tensor):
                    q = "" if val.quant is None else f"/{val.quant.scheme}"
                    if val.quant is not None and val.quant.scheme == "group":
                        q += f":{val.quant.group}"
                    parts.append(f"{f.name}={val.dtype}{q}{list(val.shape)}")
                elif val is not None:
                    parts.append(f"{f.name}={val}")
            extra = ""
            if isinstance(op, NeuronField):
                n_frozen = int(op.frozen.data.sum())
                noun = "neuron" if op.n_neurons == 1 else "neurons"
                extra = f"  # {op.n_neurons} {noun}: {n_frozen} frozen, {op.n_neurons - n_frozen} active"
            lines.append(f"%{path} = {op.kind}({', '.join(parts)}){extra}")
        lines.append(f"parameters: {self.n_params:,}  bytes: {self.nbytes:,}")
        return "\n".join(lines) + "\n"

    # --- canonical state_dict ------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """float32 values under the spec's canonical names (quantized tensors dequantized)."""
        sd: dict[str, np.ndarray] = {}
        for _path, op in self.ops():
            for f in dataclasses.fields(op):
                val = getattr(op, f.name)
                if isinstance(val, Tensor):
                    sd[val.name] = val.data if val.dtype == "bool" else val.values()
        return dict(sorted(sd.items()))


def tensor_names(c: ModelConfig) -> list[str]:
    """Canonical names of every tensor a model with config `c` has, in file order."""
    names = ["token_embed.weight", "pos_embed.weight"]
    for b in range(c.n_blocks):
        p = f"blocks.{b}"
        names += [f"{p}.ln1.weight", f"{p}.ln1.bias"]
        for proj in ("q", "k", "v", "out"):
            names += [f"{p}.attn.{proj}_proj.weight", f"{p}.attn.{proj}_proj.bias"]
        names += [f"{p}.ln2.weight", f"{p}.ln2.bias"]
        names += [f"{p}.field.{x}" for x in ("positions", "values", "temperature", "frozen")]
        names += [f"{p}.ln3.weight", f"{p}.ln3.bias"]
        names += [f"{p}.ffn.fc1.weight", f"{p}.ffn.fc1.bias", f"{p}.ffn.fc2.weight", f"{p}.ffn.fc2.bias"]
    if c.final_norm:
        names += ["ln_f.weight", "ln_f.bias"]
    if not c.tie_head:
        names.append("head.weight")
    names.append("head.bias")
    return names


def build_graph(
    config: ModelConfig,
    params: dict[str, Tensor],
    tokenizer: dict[str, Any] | None = None,
    vocab_map: np.ndarray | None = None,
    orig_vocab_size: int | None = None,
    meta: dict[str, Any] | None = None,
) -> Graph:
    """Assemble a verified graph from tensors under the spec's canonical names."""

    def get(name: str) -> Tensor:
        if name not in params:
            raise CrystalError(f"missing parameter {name}")
        return params[name]

    def ln(prefix: str) -> LayerNorm:
        return LayerNorm(get(f"{prefix}.weight"), get(f"{prefix}.bias"))

    blocks = []
    for b in range(config.n_blocks):
        p = f"blocks.{b}"
        proj = {k: (get(f"{p}.attn.{k}_proj.weight"), get(f"{p}.attn.{k}_proj.bias"))
                for k in ("q", "k", "v", "out")}
        attn = CausalSelfAttention(
            config.n_heads, proj["q"][0], proj["q"][1], proj["k"][0], proj["k"][1],
            proj["v"][0], proj["v"][1], proj["out"][0], proj["out"][1],
        )
        field_ = NeuronField(
            get(f"{p}.field.positions"), get(f"{p}.field.values"), get(f"{p}.field.temperature"),
            get(f"{p}.field.frozen"), config.field_norm, float(config.field_eps),
        )
        ffn = FFN(get(f"{p}.ffn.fc1.weight"), get(f"{p}.ffn.fc1.bias"),
                  get(f"{p}.ffn.fc2.weight"), get(f"{p}.ffn.fc2.bias"))
        blocks.append(Block(ln(f"{p}.ln1"), attn, ln(f"{p}.ln2"), field_, ln(f"{p}.ln3"), ffn))
    head = Head(None if config.tie_head else get("head.weight"), get("head.bias"), config.tie_head)
    g = Graph(
        config=config,
        token_embed=Embedding(get("token_embed.weight")),
        pos_embed=PositionEmbedding(get("pos_embed.weight")),
        blocks=tuple(blocks),
        final_norm=ln("ln_f") if config.final_norm else None,
        head=head,
        tokenizer=tokenizer,
        vocab_map=vocab_map,
        orig_vocab_size=orig_vocab_size,
        meta=dict(meta or {}),
    )
    return g.verify()
