"""The reference interpreter: numpy, float32, one function per IR op.

This is the truth every backend is compared against. It favours the spec's
formulas over speed; the only liberty taken is computing GELU's erf in float64,
which is closer to the exact function than any float32 implementation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from crystalc.config import ModelConfig
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.ops import FFN, CausalSelfAttention, Head, LayerNorm, NeuronField
from crystalc.ir.sampling import first_argmax
from crystalc.ir.tensor import Tensor

_erf = np.frompyfunc(math.erf, 1, 1)


def _w(t: Tensor) -> np.ndarray:
    return t.values()


def check_ids(ids: Sequence[int] | np.ndarray, n_ctx: int, vocab_size: int) -> np.ndarray:
    """ids as an int64 array, or a CrystalError: a sequence of 1..n_ctx current-vocabulary ids."""
    raw = np.asarray(ids)
    if raw.ndim != 1:
        raise CrystalError(f"token ids must be a sequence, got an array of {raw.ndim} dimensions")
    if raw.size and raw.dtype.kind not in "iu":  # int64 of 1.9 would be 1, of True 1, of "3" 3
        raise CrystalError(f"token ids must be integers, got {raw.dtype}")
    arr = raw.astype(np.int64)
    if not 1 <= len(arr) <= n_ctx:
        raise CrystalError(f"sequence of {len(arr)} tokens; the model takes 1..{n_ctx}")
    if arr.min() < 0 or arr.max() >= vocab_size:
        raise CrystalError(f"token id outside 0..{vocab_size - 1}")
    return arr


def field_temperatures(op: NeuronField) -> np.ndarray:
    """|tau| + 0.1 of each neuron in float32: the spec's divisor of the distance."""
    return np.abs(_w(op.temperature)) + np.float32(0.1)


def token_embedding(weight: Tensor, ids: np.ndarray) -> np.ndarray:
    return _w(weight)[ids]


def position_embedding(weight: Tensor, s: int) -> np.ndarray:
    return _w(weight)[:s]


def layer_norm(op: LayerNorm, x: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True, dtype=np.float32)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True, dtype=np.float32)
    return ((x - mean) / np.sqrt(var + np.float32(eps)) * _w(op.weight) + _w(op.bias)).astype(np.float32)


# Called with each linear layer's weight and the rows it multiplies, as the forward pass uses them:
# calibrated rounding (passes/calibrate.py) records the inputs of the layers it rounds this way.
Tap = Callable[[Tensor, np.ndarray], None]


def linear(x: np.ndarray, weight: Tensor, bias: Tensor, tap: Tap | None = None) -> np.ndarray:
    if tap is not None:
        tap(weight, x)
    return (x @ _w(weight).T + _w(bias)).astype(np.float32)


def causal_attention(op: CausalSelfAttention, h: np.ndarray, tap: Tap | None = None) -> np.ndarray:
    s, d = h.shape
    nh = op.n_heads
    hd = d // nh
    q = linear(h, op.q_weight, op.q_bias, tap).reshape(s, nh, hd).transpose(1, 0, 2)
    k = linear(h, op.k_weight, op.k_bias, tap).reshape(s, nh, hd).transpose(1, 0, 2)
    v = linear(h, op.v_weight, op.v_bias, tap).reshape(s, nh, hd).transpose(1, 0, 2)
    scores = (q @ k.transpose(0, 2, 1)) / np.float32(math.sqrt(hd))
    scores = np.where(np.tril(np.ones((s, s), dtype=bool)), scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p = p / p.sum(axis=-1, keepdims=True)
    y = (p @ v).transpose(1, 0, 2).reshape(s, d).astype(np.float32)
    return linear(y, op.out_weight, op.out_bias, tap)


def neuron_field(op: NeuronField, h: np.ndarray) -> np.ndarray:
    s, d = h.shape
    if op.n_neurons == 0:
        return np.zeros((s, d), dtype=np.float32)
    pos = _w(op.positions)
    diff = h[:, None, :] - pos[None, :, :]
    dist = np.sqrt((diff * diff).sum(axis=-1, dtype=np.float32))
    w = np.exp(-dist / field_temperatures(op)).astype(np.float32)
    if op.normalize:
        w = w / (w.sum(axis=-1, keepdims=True) + np.float32(op.eps))
    return (w @ _w(op.values)).astype(np.float32)


def gelu(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    erf = np.asarray(_erf(x64 / math.sqrt(2.0)), dtype=np.float64)
    return (0.5 * x64 * (1.0 + erf)).astype(np.float32)


def ffn(op: FFN, h: np.ndarray, tap: Tap | None = None) -> np.ndarray:
    return linear(gelu(linear(h, op.fc1_weight, op.fc1_bias, tap)), op.fc2_weight, op.fc2_bias, tap)


def head(op: Head, weight: Tensor, h: np.ndarray, tap: Tap | None = None) -> np.ndarray:
    return linear(h, weight, op.bias, tap)


FieldFn = Callable[[int, NeuronField, np.ndarray], np.ndarray]


def forward(graph: Graph, ids: Sequence[int], field_fn: FieldFn | None = None) -> np.ndarray:
    """Logits [S, V] for current-vocabulary ids, 1 <= S <= n_ctx.

    `field_fn(block, op, h)`, when given, computes the neuron_field ops in place of
    `neuron_field` (a backend that implements only that op, e.g. as a circuit).
    """
    c = graph.config
    return forward_batch(graph, check_ids(ids, c.n_ctx, c.vocab_size)[None], field_fn)[0]


BATCH_FLOATS = 1 << 24  # the widest intermediate of a forward_batch call, in floats (64 MiB)


def windows_per_batch(config: ModelConfig, s: int) -> int:
    """How many windows of s positions one forward_batch call takes within BATCH_FLOATS: the widest
    per-position intermediate is the field's distances [N, D], the FFN's hidden layer or the logits."""
    widest = max([config.d_model * n for n in config.n_neurons] + [config.ffn_hidden, config.vocab_size])
    return max(1, BATCH_FLOATS // (s * widest))


def forward_batch(graph: Graph, ids: np.ndarray, field_fn: FieldFn | None = None,
                  tap: Tap | None = None) -> np.ndarray:
    """Logits [B, S, V] of B windows of S current-vocabulary ids [B, S] (checked by the caller), each the
    forward pass above: every op but attention works on the B x S positions as rows, attention window
    by window. The one place the model's blocks are walked (evaluation and calibration batch through it)."""
    c = graph.config
    b, s = ids.shape
    x = (token_embedding(graph.token_embed.weight, ids) + position_embedding(graph.pos_embed.weight, s))
    x = x.astype(np.float32).reshape(b * s, -1)
    field = field_fn or (lambda _b, op, h: neuron_field(op, h))
    for i, blk in enumerate(graph.blocks):
        h = layer_norm(blk.ln1, x, c.ln_eps).reshape(b, s, -1)
        x = x + np.concatenate([causal_attention(blk.attn, h[w], tap) for w in range(b)])
        x = x + field(i, blk.field, layer_norm(blk.ln2, x, c.ln_eps))
        x = x + ffn(blk.ffn, layer_norm(blk.ln3, x, c.ln_eps), tap)
    if graph.final_norm is not None:
        x = layer_norm(graph.final_norm, x, c.ln_eps)
    return head(graph.head, graph.head_weight, x, tap).reshape(b, s, -1)


def generate(
    graph: Graph,
    prompt: Sequence[int],
    n: int,
    shift: int = 1,
    pick: Callable[[np.ndarray], int] | None = None,
    logits_of: Callable[[list[int]], np.ndarray] | None = None,
) -> list[int]:
    """Continue `prompt` (current ids) by n tokens with the spec's window semantics.

    A prompt longer than the window keeps its last n_ctx tokens; when the window
    is full, the oldest `shift` tokens are dropped before the next one is added.
    `pick` chooses a token from logits; greedy (first maximum) by default.
    `logits_of` gives a context's last logits (another implementation of the
    graph, such as a hardware target's emulator); the interpreter's by default.
    """
    t = graph.config.n_ctx
    if not 1 <= shift <= t:
        raise CrystalError(f"--shift {shift} is outside 1..{t}")
    if not prompt:
        raise CrystalError("empty prompt")
    choose = pick or first_argmax  # NaNs skipped, as the programs' greedy pick skips them
    ctx = list(prompt)[-t:]
    out: list[int] = []
    for i in range(n):
        tok = choose(forward(graph, ctx)[-1] if logits_of is None else logits_of(ctx))
        out.append(tok)
        if i + 1 == n:
            break
        if len(ctx) == t:
            ctx = ctx[shift:]
        ctx.append(tok)
    return out
