"""The baselines' generation loops: PyTorch eager (recompute, or a KV cache) and ONNX Runtime (float32, int8).

Every loop follows the spec's window semantics exactly as crystalc.ir.interpret.generate
does (a prompt longer than T keeps its last T tokens; when the window is full the oldest
K tokens are dropped), so the C program and each baseline produce the same tokens and do
the same generation work. Greedy: the first maximum, like numpy's argmax.

Each loop is a Python generator that yields one token at a time, so the caller can time
any stretch of the generation (e.g. only the tokens past the prompt's own forward).
All baselines compute the head for the last position only, as the C program does: the
seeds' `model(ctx)[:, -1]` spends 64x the head's work on logits nobody reads, and a
ratio against that would measure the waste, not the compiler. `generate_full_logits`
keeps the seeds' form as a reference row. The `_pruned` forms go one step further, as the
generated C does: the last block computes every position only up to its keys and values,
and its query, attention output, field and FFN for the last position alone (the others'
outputs feed nothing), so a ratio against them compares the same work.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from crystalc.model import CrystalLM


def _check(model: CrystalLM, prompt: list[int], shift: int) -> tuple[int, list[int]]:
    t = model.config.n_ctx
    if not 1 <= shift <= t or not prompt:
        raise ValueError(f"bad shift {shift} or empty prompt")
    return t, list(prompt)[-t:]


def _head(model: CrystalLM, x_last: torch.Tensor) -> torch.Tensor:
    if model.config.final_norm:
        x_last = model.ln_f(x_last)
    head_linear = getattr(model, "head_linear", None)  # int8_dynamic's
    if head_linear is not None:
        return head_linear(x_last[None])[0]
    w = model.token_embed.weight if model.config.tie_head else model.head.weight
    return F.linear(x_last, w, model.head.bias)


def int8_dynamic(model: CrystalLM) -> CrystalLM:
    """PyTorch's own int8 path for this model: a copy whose linear layers, the head among them (as the
    nn.Linear `head_linear`), are dynamically quantized: int8 weights with one scale a tensor, as the bench's
    mixed8 codes (per tensor), activations quantized at run time (which the C does not do). Embeddings, norms
    and the field stay float32 (mixed8 keeps the embeddings so, and codes the field)."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    m = copy.deepcopy(model)
    w = m.token_embed.weight if m.config.tie_head else m.head.weight
    head = nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        head.weight.copy_(w)
        head.bias.copy_(m.head.bias)
    m.head_linear = head
    with warnings.catch_warnings():  # deprecated in favour of torchao, which is not installed; it still works
        warnings.simplefilter("ignore")
        return quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


def neuron_field(field: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The field as the seeds' PyTorch model computes it: torch.cdist, then exp, normalise, mix.

    crystalc.model evaluates the spec's sqrt(sum (h - p)^2) by broadcasting a [S, N, D]
    difference, exact but about 10x slower in eager mode on this shape; the baseline is
    the faster formulation a PyTorch user (and the seeds) would run.
    """
    if field.n_neurons == 0:
        return torch.zeros_like(h)
    flat = h.reshape(-1, h.shape[-1])
    w = torch.exp(-torch.cdist(flat, field.positions) / (field.temperature.abs() + 0.1))
    if field.normalize:
        w = w / (w.sum(-1, keepdim=True) + field.eps)
    return (w @ field.values).reshape(h.shape)


def block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x + blk.attn(blk.ln1(x))
    x = x + neuron_field(blk.field, blk.ln2(x))
    return x + blk.ffn(blk.ln3(x))


def forward_last(model: CrystalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids [1, S] -> logits [V] of the last position: CrystalLM.forward with the head on one row."""
    pos = torch.arange(ids.shape[-1])
    x = model.token_embed(ids) + model.pos_embed(pos)
    for blk in model.blocks:
        x = block(blk, x)
    return _head(model, x[0, -1])


def forward_last_pruned(model: CrystalLM, ids: torch.Tensor) -> torch.Tensor:
    """forward_last, with the last block past its keys and values on the last position only."""
    pos = torch.arange(ids.shape[-1])
    x = model.token_embed(ids) + model.pos_embed(pos)
    for blk in model.blocks[:-1]:
        x = block(blk, x)
    blk = model.blocks[-1]
    attn = blk.attn
    h = blk.ln1(x[0])  # [S, D]
    s, d = h.shape
    nh = attn.n_heads
    hd = d // nh
    q = attn.q_proj(h[-1:]).view(1, nh, hd).transpose(0, 1)    # [H, 1, hd]: the last query sees every key
    k = attn.k_proj(h).view(s, nh, hd).transpose(0, 1)
    v = attn.v_proj(h).view(s, nh, hd).transpose(0, 1)
    y = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(hd), dim=-1) @ v
    x = x[0, -1:] + attn.out_proj(y.transpose(0, 1).reshape(1, d))
    x = x + neuron_field(blk.field, blk.ln2(x))
    x = x + blk.ffn(blk.ln3(x))
    return _head(model, x[-1])


def forward_all(model: CrystalLM, ids: torch.Tensor) -> torch.Tensor:
    """ids [1, S] -> logits [S, V]: the seeds' forward, logits for every position."""
    pos = torch.arange(ids.shape[-1])
    x = model.token_embed(ids) + model.pos_embed(pos)
    for blk in model.blocks:
        x = block(blk, x)
    if model.config.final_norm:
        x = model.ln_f(x)
    w = model.token_embed.weight if model.config.tie_head else model.head.weight
    return F.linear(x[0], w, model.head.bias)


@torch.inference_mode()
def _generate_by_recompute(last_logits: Callable[[CrystalLM, torch.Tensor], torch.Tensor], model: CrystalLM,
                           prompt: list[int], n: int, shift: int) -> Iterator[int]:
    """Greedy tokens, recomputing the whole context for each with `last_logits` (the spec's window)."""
    t, ctx = _check(model, prompt, shift)
    for i in range(n):
        tok = int(torch.argmax(last_logits(model, torch.tensor([ctx]))))
        yield tok
        if i + 1 == n:
            return
        if len(ctx) == t:
            ctx = ctx[shift:]
        ctx.append(tok)


def generate_recompute(model: CrystalLM, prompt: list[int], n: int, shift: int = 1) -> Iterator[int]:
    """Recompute the whole context for every token (the seeds' generate, head on the last row)."""
    return _generate_by_recompute(forward_last, model, prompt, n, shift)


def generate_recompute_pruned(model: CrystalLM, prompt: list[int], n: int, shift: int = 1) -> Iterator[int]:
    """generate_recompute with the last block's dead rows skipped (forward_last_pruned)."""
    return _generate_by_recompute(forward_last_pruned, model, prompt, n, shift)


def generate_full_logits(model: CrystalLM, prompt: list[int], n: int, shift: int = 1) -> Iterator[int]:
    """The seeds' form exactly: logits for every position, then the last row."""
    return _generate_by_recompute(lambda m, ids: forward_all(m, ids)[-1], model, prompt, n, shift)


class KVCache:
    """Per block, keys and values [H, T, D/H] of the positions computed so far."""

    def __init__(self, model: CrystalLM) -> None:
        c = model.config
        self.k = [torch.zeros(c.n_heads, c.n_ctx, c.head_dim) for _ in model.blocks]
        self.v = [torch.zeros(c.n_heads, c.n_ctx, c.head_dim) for _ in model.blocks]


def _attend(blk: nn.Module, h: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, start: int,
            last_only: bool = False) -> torch.Tensor:
    """Causal attention for positions start..start+S-1 of h [S, D], reading and filling the cache; with
    `last_only`, keys and values for all S but the query and output of the last alone ([1, D])."""
    attn = blk.attn
    s, d = h.shape
    nh = attn.n_heads
    hd = d // nh
    cache_k[:, start:start + s] = attn.k_proj(h).view(s, nh, hd).transpose(0, 1)
    cache_v[:, start:start + s] = attn.v_proj(h).view(s, nh, hd).transpose(0, 1)
    keys, vals = cache_k[:, :start + s], cache_v[:, :start + s]
    rows = h[-1:] if last_only else h
    r = rows.shape[0]
    scores = attn.q_proj(rows).view(r, nh, hd).transpose(0, 1) @ keys.transpose(-2, -1) / math.sqrt(hd)
    if r > 1:
        # Query i sits at position start+i and sees keys 0..start+i (the last query sees them all).
        visible = torch.arange(start + s)[None, :] <= (start + torch.arange(s))[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
    y = torch.softmax(scores, dim=-1) @ vals
    return attn.out_proj(y.transpose(0, 1).reshape(r, d))


def _forward_cached(model: CrystalLM, cache: KVCache, ids: list[int], start: int, pruned: bool = False
                    ) -> torch.Tensor:
    """Compute positions start..start+len(ids)-1 with the cache; logits [V] of the last one. `pruned`: the
    last block past its keys and values for the last position alone, as the generated C does."""
    pos = torch.arange(start, start + len(ids))
    x = model.token_embed(torch.tensor(ids)) + model.pos_embed(pos)
    for b, blk in enumerate(model.blocks):
        last_only = pruned and b == len(model.blocks) - 1
        x = (x[-1:] if last_only else x) + _attend(blk, blk.ln1(x), cache.k[b], cache.v[b], start, last_only)
        x = x + neuron_field(blk.field, blk.ln2(x))
        x = x + blk.ffn(blk.ln3(x))
    return _head(model, x[-1])


@torch.inference_mode()
def generate_kv(model: CrystalLM, prompt: list[int], n: int, shift: int = 1, pruned: bool = False
                ) -> Iterator[int]:
    """The spec's shifting with a KV cache: one position per token while the window has room;
    when it is full, drop `shift` tokens and recompute the remaining T-K (plus the new one).
    `pruned`: each recompute skips the last block's dead rows (_forward_cached)."""
    t, ctx = _check(model, prompt, shift)
    cache = KVCache(model)
    logits = _forward_cached(model, cache, ctx, 0, pruned)
    for i in range(n):
        tok = int(torch.argmax(logits))
        yield tok
        if i + 1 == n:
            return
        if len(ctx) == t:
            ctx = ctx[shift:] + [tok]
            logits = _forward_cached(model, cache, ctx, 0, pruned)
        else:
            ctx.append(tok)
            logits = _forward_cached(model, cache, [tok], len(ctx) - 1, pruned)


class LastLogits(nn.Module):
    """The exported graph: ids [1, T] -> logits [1, V] of the last position (pruned: the last
    block's dead rows skipped, the C program's work)."""

    def __init__(self, model: CrystalLM, pruned: bool = False) -> None:
        super().__init__()
        self.model = model
        self.last = forward_last_pruned if pruned else forward_last

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.last(self.model, ids).unsqueeze(0)


def export_onnx(model: CrystalLM, path: Path, pruned: bool = False) -> Path:
    """torch.onnx.export (TorchScript exporter, opset 17) with a fixed [1, T] int64 input."""
    ids = torch.zeros(1, model.config.n_ctx, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The tracer warns that Python-level shapes become constants: intended, the input is fixed.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(LastLogits(model, pruned).eval(), (ids,), str(path), dynamo=False, opset_version=17,
                          input_names=["ids"], output_names=["logits"])
    return path


def quantize_onnx_int8(src: Path, dst: Path) -> Path:
    """ONNX Runtime's own int8 path for an export_onnx model, as its documentation prescribes: quant_pre_process
    (shape inference and ORT's basic graph optimisations, which fold constants; quantize_dynamic warns without
    it), then quantize_dynamic with int8 weights (QInt8, one symmetric scale a tensor) for every MatMul with a
    constant weight: the linear layers, the head among them (dynamic mode rewrites a Gemm as a MatMul first), and
    the field's values (and, where the pre-processing folded it, cdist's constant operand, the positions).
    Activations are quantized at run time (to uint8, ORT's only dynamic choice), which the C does not do. Only
    MatMul is quantized: the default op list also holds Gather, which would make the embeddings int8 (mixed8
    and PyTorch's int8 path keep them float32)."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    pre = dst.with_name(dst.stem + "-preprocessed.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_dynamic(str(pre), str(dst), op_types_to_quantize=["MatMul"], per_channel=False, reduce_range=False,
                     weight_type=QuantType.QInt8)
    return dst


def ort_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def generate_ort_window(session, t: int, prompt: list[int], n: int) -> Iterator[int]:
    """The exact sliding window (--shift 1) past the window: every token runs the fixed
    T-token graph on the last T tokens. The prompt must already fill the window."""
    if len(prompt) < t:
        raise ValueError("the ONNX graph has a fixed input of T tokens: the prompt must fill the window")
    ctx = np.array([prompt[-t:]], dtype=np.int64)
    for i in range(n):
        tok = int(np.argmax(session.run(None, {"ids": ctx})[0][0]))
        yield tok
        if i + 1 == n:
            return
        ctx = np.concatenate([ctx[:, 1:], np.array([[tok]], dtype=np.int64)], axis=1)
