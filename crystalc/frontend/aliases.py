"""The seeds' own parameter names (causal_crystal.py), mapped onto the canonical ones."""

from __future__ import annotations

import re

# Buffers the seeds' training kept in the state_dict; they do not change the forward pass.
TRAINING_BUFFERS = re.compile(
    r"^(causal_attn\.mask|(geo_attn|attention)\.(gradient_acc|gradient_history|history_ptr|"
    r"birth_epoch|update_count))$"
)

_RULES: tuple[tuple[str, str], ...] = (
    (r"^causal_attn\.(q|k|v|out)_proj\.(weight|bias)$", r"blocks.0.attn.\1_proj.\2"),
    (r"^norm_causal\.(weight|bias)$", r"blocks.0.ln1.\1"),
    (r"^(?:geo_attn|attention)\.(positions|values|temperature|frozen)$", r"blocks.0.field.\1"),
    (r"^norm_geo\.(weight|bias)$", r"blocks.0.ln2.\1"),
    (r"^ffn\.0\.(weight|bias)$", r"blocks.0.ffn.fc1.\1"),
    (r"^ffn\.2\.(weight|bias)$", r"blocks.0.ffn.fc2.\1"),
    (r"^norm_ffn\.(weight|bias)$", r"blocks.0.ln3.\1"),
)

# Config keys the seeds used, onto the spec's.
CONFIG_ALIASES = {
    "num_heads": "n_heads",
    "embed_dim": "d_model",
    "context_len": "n_ctx",
    "context_length": "n_ctx",
    "num_neurons": "n_neurons",
    "hidden_dim": "ffn_hidden",
}


def is_seeds_layout(keys: list[str]) -> bool:
    return any(k.startswith(("causal_attn.", "geo_attn.", "attention.", "norm_causal.")) for k in keys)


def canonical_name(key: str) -> str | None:
    """The canonical name of a seeds' key; None for a training-only buffer."""
    if TRAINING_BUFFERS.match(key):
        return None
    for pattern, repl in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    return key
