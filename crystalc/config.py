"""The model configuration: the table at the top of spec/model.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from crystalc.errors import CrystalError

# Dimensions beyond these are not a model we can compile on one machine; they
# are almost always a corrupted or hostile file, and rejecting them early keeps
# every product of dimensions far from integer overflow downstream.
MAX_DIM = 1 << 20
MAX_ELEMENTS = 1 << 31
FLOAT32_MAX = 3.4028234663852886e38
# The two defaults that depend on other fields (the spec: 2*D hidden units, 64 neurons a block) are
# filled in by __post_init__; Any lets the field keep its int type for every reader.
_DERIVED: Any = None


def as_int(name: str, v: Any) -> int:
    """A config integer: an int, or a float holding one (JSON writers differ); nothing else."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise CrystalError(f"config: {name} must be an integer, got {v!r}")
    return v


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int = 128
    n_ctx: int = 64
    n_heads: int = 4
    n_blocks: int = 1
    n_neurons: tuple[int, ...] = _DERIVED  # 64 a block
    ffn_hidden: int = _DERIVED  # 2 * d_model
    field_norm: bool = True
    field_eps: float = 1e-8
    final_norm: bool = False
    tie_head: bool = False
    ln_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", 2 * self.d_model)
        if self.n_neurons is None and isinstance(self.n_blocks, int):
            # an absurd block count is validate()'s to name, not a tuple's to allocate
            object.__setattr__(self, "n_neurons", (64,) * min(self.n_blocks, MAX_DIM + 1))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def summary(self) -> str:
        """One line of the shape, for the headers of generated files."""
        return (f"V={self.vocab_size} D={self.d_model} T={self.n_ctx} H={self.n_heads} L={self.n_blocks} "
                f"F={self.ffn_hidden} neurons={list(self.n_neurons)} field_norm={int(self.field_norm)} "
                f"final_norm={int(self.final_norm)} tie_head={int(self.tie_head)}")

    @classmethod
    def check_fields(cls, d: dict[Any, Any]) -> None:
        """Every key of a config dict names a field (a partial config's too)."""
        if any(not isinstance(k, str) for k in d):
            raise CrystalError(f"config: key {next(k for k in d if not isinstance(k, str))!r} is not a string")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise CrystalError(f"config: unknown field(s) {', '.join(unknown)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a checkpoint's config dict, filling the spec's defaults."""
        cls.check_fields(d)
        if "vocab_size" not in d:
            raise CrystalError("config: missing field vocab_size")
        kw = dict(d)
        for name in ("vocab_size", "d_model", "n_ctx", "n_heads", "n_blocks", "ffn_hidden"):
            if name in kw:
                kw[name] = as_int(name, kw[name])
        if "n_neurons" in kw:
            neurons = kw["n_neurons"]
            if isinstance(neurons, (list, tuple)):
                kw["n_neurons"] = tuple(as_int("n_neurons entry", n) for n in neurons)
            else:
                kw["n_neurons"] = (as_int("n_neurons", neurons),) * min(kw.get("n_blocks", 1), MAX_DIM)
        try:
            cfg = cls(**kw)
        except (TypeError, ValueError) as e:
            raise CrystalError(f"config: {e}") from None
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["n_neurons"] = list(self.n_neurons)
        return d

    def validate(self) -> None:
        ints = ("vocab_size", "d_model", "n_ctx", "n_heads", "n_blocks", "ffn_hidden")
        for name in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise CrystalError(f"config: {name} must be an integer, got {v!r}")
            if not 1 <= v <= MAX_DIM:
                shown = str(v) if abs(v) < 10**12 else f"a number of {len(str(abs(v)))} digits"  # not 300 of them
                raise CrystalError(f"config: {name} = {shown} is outside 1..{MAX_DIM}")
        for name in ("field_norm", "final_norm", "tie_head"):
            if not isinstance(getattr(self, name), bool):
                raise CrystalError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        if len(self.n_neurons) != self.n_blocks:
            raise CrystalError(
                f"config: n_neurons has {len(self.n_neurons)} entries for {self.n_blocks} blocks"
            )
        for n in self.n_neurons:
            if not 0 <= n <= MAX_DIM:
                raise CrystalError(f"config: n_neurons entry {n} is outside 0..{MAX_DIM}")
        if self.d_model % self.n_heads:
            raise CrystalError(f"config: d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        for name in ("field_eps", "ln_eps"):
            v = getattr(self, name)
            # every backend computes with them in float32: past its largest value they would be inf there
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and 0 <= v <= FLOAT32_MAX):
                raise CrystalError(f"config: {name} must be a finite non-negative number within float32's range, "
                                   f"got {v!r}")
        for rows, cols, what in (
            (self.vocab_size, self.d_model, "token_embed"),
            (self.n_ctx, self.d_model, "pos_embed"),
            (self.ffn_hidden, self.d_model, "ffn.fc1"),
            (self.d_model, self.d_model, "attn.q_proj"),
            (max(self.n_neurons, default=0), self.d_model, "field.positions"),
        ):
            if rows * cols > MAX_ELEMENTS:
                raise CrystalError(f"config: {what} would hold {rows}x{cols} elements, more than {MAX_ELEMENTS}")
