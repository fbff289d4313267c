"""Lowering a raw checkpoint to the crystal IR: alias names, infer or check the config, validate."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from crystalc.config import ModelConfig, as_int
from crystalc.errors import CrystalError
from crystalc.frontend import aliases
from crystalc.frontend.raw import RawCheckpoint
from crystalc.ir.graph import Graph, build_graph, tensor_names
from crystalc.ir.tensor import Tensor

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.")
_CANONICAL = re.compile(
    r"^(token_embed\.weight|pos_embed\.weight|ln_f\.(weight|bias)|head\.(weight|bias)|"
    r"blocks\.\d+\.(ln[123]\.(weight|bias)|attn\.(q|k|v|out)_proj\.(weight|bias)|"
    r"field\.(positions|values|temperature|frozen)|ffn\.fc[12]\.(weight|bias)))$"
)


_SCALARS = (type(None), bool, int, float, str)


def _given(config: dict[Any, Any]) -> dict[Any, Any]:
    """The config under the spec's names. A field's value must be JSON's kind of value, as the comparisons and
    checks of the config expect (a tensor of two elements has no truth value); the seeds' training settings,
    ignored, may be anything."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    given: dict[Any, Any] = {}
    said_by: dict[Any, Any] = {}
    for k, v in config.items():
        name = aliases.CONFIG_ALIASES.get(k, k)
        if name in fields:
            if not isinstance(v, (*_SCALARS, list, tuple)):
                raise CrystalError(f"config: {k} is a {type(v).__name__}")
            for entry in v if isinstance(v, (list, tuple)) else ():
                if not isinstance(entry, _SCALARS):
                    raise CrystalError(f"config: {k} holds a {type(entry).__name__}")
        if name in given:
            # Two spellings of one field (n_heads and num_heads) saying the same value say one thing; saying
            # two, either would be a guess at the model, so neither is taken.
            if type(v) is not type(given[name]) or v != given[name]:
                raise CrystalError(f"config: {said_by[name]} and {k} both give {name}")
        given[name], said_by[name] = v, k
    return given


def _shape(state: dict[str, np.ndarray], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CrystalError(f"missing parameter {key}")
    a = state[key]
    if a.ndim != ndim:
        raise CrystalError(f"{key}: shape {list(a.shape)}, expected a {ndim}-D tensor")
    return a.shape


def infer_config(state: dict[str, np.ndarray], given: dict[str, Any], n_heads: int | None,
                 default_heads: int | None) -> ModelConfig:
    """The config a bare state_dict implies; n_heads cannot be seen in shapes. `given`: what a partial
    config (or the seeds') says, of which n_heads, field_norm and the epsilons are taken."""
    v, d = _shape(state, "token_embed.weight", 2)
    t, d2 = _shape(state, "pos_embed.weight", 2)
    if d2 != d:
        raise CrystalError(f"pos_embed.weight: shape {[t, d2]}, expected [{t}, {d}] (d_model of token_embed)")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))})
    if blocks != list(range(len(blocks))):
        raise CrystalError(f"block indices {blocks} are not 0..{len(blocks) - 1}")
    if not blocks:
        raise CrystalError("no blocks.* parameters found")
    neurons = tuple(_shape(state, f"blocks.{b}.field.positions", 2)[0] for b in blocks)
    f = _shape(state, "blocks.0.ffn.fc1.weight", 2)[0]
    if n_heads is not None and given.get("n_heads", n_heads) != n_heads:
        raise CrystalError(f"--n-heads {n_heads} disagrees with the checkpoint's n_heads {given['n_heads']!r}")
    heads = next((h for h in (n_heads, given.get("n_heads"), default_heads) if h is not None), None)
    if heads is None:
        raise CrystalError("n_heads cannot be inferred from weights alone (a bare state_dict, or a .safetensors "
                           "without its JSON config beside it): pass --n-heads")
    cfg: dict[str, Any] = {
        "vocab_size": v, "d_model": d, "n_ctx": t, "n_heads": as_int("n_heads", heads), "n_blocks": len(blocks),
        "n_neurons": list(neurons), "ffn_hidden": f,
        "final_norm": "ln_f.weight" in state, "tie_head": "head.weight" not in state,
    }
    for k in ("field_norm", "field_eps", "ln_eps"):
        if k in given:
            cfg[k] = given[k]
    return ModelConfig.from_dict(cfg)


def _check_partial(config: ModelConfig, given: dict[str, Any]) -> None:
    """A partial config's fields (all but n_heads, field_norm and the epsilons, which shapes cannot show)
    must be what the tensors say: a tie_head false without head.weight is a damaged file, not a tied head."""
    inferred = config.to_dict()
    for k, said in given.items():
        if k in ("n_heads", "field_norm", "field_eps", "ln_eps"):
            continue
        if k == "n_neurons" and not isinstance(said, (list, tuple)):
            said = [said] * config.n_blocks  # one count for every block
        if isinstance(said, tuple):
            said = list(said)
        if said != inferred[k] or isinstance(said, bool) != isinstance(inferred[k], bool):
            raise CrystalError(f"the config says {k} = {said!r}, but the tensors say {inferred[k]!r}")


def _contiguous(a: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray, which makes a 0-d array 1-D: a scalar would pass for a tensor of one element
    return a if a.flags.c_contiguous else np.array(a, order="C")


def lower(raw: RawCheckpoint, n_heads: int | None = None) -> Graph:
    keys = list(raw.state)
    seeds = aliases.is_seeds_layout(keys)
    state: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}  # canonical name -> the key it came from
    for k in keys:
        if seeds and _BLOCK_KEY.match(k):
            theirs = next(k2 for k2 in keys if aliases.is_seeds_layout([k2]))
            raise CrystalError(f"the checkpoint mixes the seeds' names ({theirs}) with crystalc's ({k})")
        name = aliases.canonical_name(k) if seeds else k
        if name is None:
            continue
        if not _CANONICAL.match(name):
            raise CrystalError(f"unexpected parameter {k} {list(raw.state[k].shape)}")
        if name in state:  # e.g. geo_attn.* and the older attention.* side by side: which is the model?
            raise CrystalError(f"{source[name]} and {k} both give {name}")
        state[name], source[name] = raw.state[k], k

    given = _given(raw.config or {})
    if not seeds:  # the seeds' config carries training settings (lr...), which are ignored; a crystalc one only fields
        ModelConfig.check_fields(given)
    if raw.config is not None and not seeds and "vocab_size" in given:
        if n_heads is not None and given.get("n_heads", n_heads) != n_heads:
            raise CrystalError(f"--n-heads {n_heads} disagrees with the checkpoint's n_heads {given['n_heads']}")
        if n_heads is not None:
            given["n_heads"] = n_heads
        config = ModelConfig.from_dict(given)
    else:
        # The seeds' files and bare state_dicts: shapes say everything but n_heads.
        config = infer_config(state, given, n_heads, default_heads=4 if seeds else None)
        if not seeds:  # the spec: a seeds' file's config gives n_heads, its shapes the rest
            _check_partial(config, given)

    params: dict[str, Tensor] = {}
    for name, arr in state.items():
        if name.endswith(".frozen"):
            if arr.dtype != np.bool_:  # a mask saved as numbers (safetensors has uint8 for bool) must be 0/1
                if arr.dtype.kind not in "uif" or not np.all((arr == 0) | (arr == 1)):
                    raise CrystalError(f"{name}: a frozen mask must be bool or 0/1, got {arr.dtype} values "
                                       "other than 0 and 1")
                arr = arr.astype(bool)
            params[name] = Tensor(name, _contiguous(arr))
            continue
        if arr.dtype.kind == "f" and arr.dtype != np.float32:  # float16/64 as .pt files' are: values checked next
            with np.errstate(over="ignore"):
                arr = arr.astype(np.float32)
        if arr.dtype != np.float32:
            raise CrystalError(f"{name}: dtype {arr.dtype}, expected a floating-point tensor")
        params[name] = Tensor(name, _contiguous(arr))
    # Older seeds' files predate freezing: no frozen buffer means nothing is frozen.
    for b, n in enumerate(config.n_neurons):
        key = f"blocks.{b}.field.frozen"
        if key not in params and f"blocks.{b}.field.positions" in params:
            params[key] = Tensor(key, np.zeros(n, dtype=bool))
    if config.tie_head and "head.weight" in params:
        # a PyTorch module whose head shares the embedding saves the one tensor under both names
        if not np.array_equal(params["head.weight"].data, params["token_embed.weight"].data):
            raise CrystalError("head.weight differs from token_embed.weight, but the config ties the head to it "
                               "(tie_head true)")
        del params["head.weight"]
    extra = sorted(set(params) - set(tensor_names(config)))
    if extra:
        raise CrystalError(f"unexpected parameter {extra[0]} {list(params[extra[0]].shape)} for this config")
    return build_graph(config, params, raw.tokenizer, meta=raw.meta)
