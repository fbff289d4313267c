"""FLOPs and bytes per generated token, derived from the model's shape and the generation schedule.

Counting convention:
  a multiply-add is 2 FLOPs; an add, multiply, divide, compare, exp, sqrt or erf is 1.
  The neuron field's distance is counted in the spec's direct form, sum_k (h_k - p_k)^2
  (3 FLOPs per element), whatever form an implementation uses.

A forward computes positions start..start+S-1; position p attends to c = p+1 keys.
Per position (one block; D model width, H heads, N neurons, F FFN width):
  embedding add            D
  3 LayerNorms             3 * 7D
  q, k, v projections      3 * (2D^2 + D)
  attention                4cD (scores and weighted sum) + 5cH (scale, max, exp, sum, divide)
  out projection           2D^2 + D
  neuron field             5ND (distance 3ND, weighted sum 2ND) + 5N (sqrt, scale, exp, sum, divide)
  FFN                      4DF + F + D (two products with biases) + 5F (exact-erf GELU)
  residual adds            3D
and once per forward, for its last position only:
  head                     2VD + V, argmax V
With the last block's dead rows skipped (the generated C, and the `_pruned` baselines), the
last block computes for every position of a forward but the last only what the last one
reads from it: its LayerNorm and its k and v projections, 7D + 2 * (2D^2 + D).

Bytes per forward (a minimal-traffic model: every parameter is read once per forward,
activations stay in L1/L2): the storage of every parameter except the two embedding
tables (of which only the S rows used are read), plus the KV cache: each new position
writes 2D floats per block and the forward reads the 2cD floats of its longest context.
Int8/int16 tensors count their codes plus their scales and offsets.
"""

from __future__ import annotations

from dataclasses import dataclass

from crystalc.config import ModelConfig

FORMULAS = __doc__.split("\n", 2)[2].strip()

EMBEDDINGS = ("token_embed.weight", "pos_embed.weight")


def position_flops(cfg: ModelConfig, c: int, n_neurons: int) -> tuple[int, int]:
    """(FLOPs, transcendentals) of one position of one block attending to c keys."""
    d, h, f, n = cfg.d_model, cfg.n_heads, cfg.ffn_hidden, n_neurons
    flops = (3 * 7 * d + 3 * (2 * d * d + d) + 4 * c * d + 5 * c * h + 2 * d * d + d
             + 5 * n * d + 5 * n + 4 * d * f + f + d + 5 * f + 3 * d)
    trans = c * h + 2 * n + f  # exp in the softmax; sqrt and exp in the field; erf in GELU
    return flops, trans


def kv_flops(cfg: ModelConfig) -> int:
    """FLOPs of one position of one block up to its keys and values: LayerNorm, k and v."""
    d = cfg.d_model
    return 7 * d + 2 * (2 * d * d + d)


def head_flops(cfg: ModelConfig) -> int:
    return 2 * cfg.vocab_size * cfg.d_model + 2 * cfg.vocab_size


# A schedule is the list of forwards (start, S) that produce a stretch of tokens.
Schedule = list[tuple[int, int]]
SCHEDULES = {
    "window-kv": "a 1-token prompt and 64 new tokens; timed: the 63 after the prompt's own forward, "
                 "each one new position (KV cache): forwards of 1 position attending to 2..64 keys",
    "window-recompute": "the same 63 tokens, recomputing the whole prefix each time: forwards of 2..64 positions",
    "past-recompute": "past the window, every token recomputes the 64-position window (--shift 1, "
                      "or any shift without a KV cache)",
    "past-kv": "past the window with --shift K and a KV cache: per K tokens, one recompute of the T-K kept "
               "positions plus the new one, then K-1 single positions (amortised 64/K positions a token)",
}


def schedule(kind: str, cfg: ModelConfig, shift: int = 1) -> tuple[Schedule, int]:
    """(forwards, tokens they produce) for one steady-state stretch of a regime (SCHEDULES)."""
    t = cfg.n_ctx
    if kind == "window-kv":
        return [(p, 1) for p in range(1, t)], t - 1
    if kind == "window-recompute":
        return [(0, s) for s in range(2, t + 1)], t - 1
    if kind == "past-recompute":
        return [(0, t)], 1
    if kind == "past-kv":
        if shift == 1:
            return [(0, t)], 1
        return [(0, t - shift + 1)] + [(p, 1) for p in range(t - shift + 1, t)], shift
    raise ValueError(kind)


@dataclass(frozen=True)
class Work:
    flops: float          # per token
    transcendentals: float
    bytes: float          # per token


def work(cfg: ModelConfig, tensor_bytes: dict[str, int], kind: str, shift: int = 1, all_logits: bool = False,
         pruned: bool = False) -> Work:
    """Per-token FLOPs, transcendentals and bytes of a regime, for a model whose tensors
    take `tensor_bytes` (name -> storage bytes, quantization parameters included).
    `all_logits`: the head runs on every position of a forward (the seeds' form).
    `pruned`: the last block's dead rows are skipped (every position of a forward but the
    last stops at the last block's keys and values)."""
    forwards, tokens = schedule(kind, cfg, shift)
    body = sum(b for name, b in tensor_bytes.items() if name not in EMBEDDINGS)
    row = (tensor_bytes["token_embed.weight"] // cfg.vocab_size
           + tensor_bytes["pos_embed.weight"] // cfg.n_ctx)
    fl = tr = by = 0.0
    for start, s in forwards:
        for p in range(start, start + s):
            for b, n in enumerate(cfg.n_neurons):
                if pruned and not all_logits and b == cfg.n_blocks - 1 and p < start + s - 1:
                    fl += kv_flops(cfg)
                    continue
                f, t = position_flops(cfg, p + 1, n)
                fl += f
                tr += t
            fl += cfg.d_model  # embedding add
        fl += head_flops(cfg) * (s if all_logits else 1)
        kv = cfg.n_blocks * (2 * cfg.d_model * 4 * s + 2 * (start + s) * cfg.d_model * 4)
        by += body + s * row + kv
    return Work(fl / tokens, tr / tokens, by / tokens)


def roofline(w: Work, peak_flops: float, peak_bw: float) -> tuple[float, str]:
    """(the roofline's tokens/s, what bounds it: 'compute' or 'memory')."""
    t_compute = w.flops / peak_flops
    t_memory = w.bytes / peak_bw
    return (1.0 / max(t_compute, t_memory), "compute" if t_compute >= t_memory else "memory")
