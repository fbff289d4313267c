"""CrystalLM: the spec's forward pass in PyTorch, under the canonical parameter names."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from crystalc.config import ModelConfig
from crystalc.errors import CrystalError

if TYPE_CHECKING:
    from crystalc.ir.graph import Graph

CHECKPOINT_FORMAT = "crystalc-checkpoint"
CHECKPOINT_VERSION = 1


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        nh, hd = self.n_heads, d // self.n_heads
        q = self.q_proj(h).view(b, s, nh, hd).transpose(1, 2)
        k = self.k_proj(h).view(b, s, nh, hd).transpose(1, 2)
        v = self.v_proj(h).view(b, s, nh, hd).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
        mask = torch.ones(s, s, dtype=torch.bool, device=h.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        return self.out_proj(y.transpose(1, 2).reshape(b, s, d))


def _field_dist(h: torch.Tensor, pos: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """d_sj = sqrt(sum_k (h_sk - pos_jk)^2), exactly the spec's formula, in chunks of neurons.

    Each entry is reduced over one contiguous row of D, so chunking changes no bit of
    the result; it only bounds the [.., chunk, D] temporary that the broadcast needs.
    """
    n = pos.shape[0]
    if n <= chunk:
        diff = h.unsqueeze(-2) - pos
        return torch.sqrt((diff * diff).sum(-1))
    out = h.new_empty(*h.shape[:-1], n)
    for a in range(0, n, chunk):
        diff = h.unsqueeze(-2) - pos[a:a + chunk]
        out[..., a:a + chunk] = torch.sqrt((diff * diff).sum(-1))
    return out


def _field_dist_mm(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The same distances through |h|^2 + |p|^2 - 2 h.p: one matmul, ~50x faster, not bit-identical.

    It differs from the spec's formula by rounding, which the subtraction amplifies
    near a neuron (up to 1e-2 absolute at D = 128, docs/training.md); training opts
    into it (NeuronField.fast_distance), inference never does.
    """
    d2 = (h * h).sum(-1, keepdim=True) + (pos * pos).sum(-1) - 2.0 * (h @ pos.t())
    return d2.clamp_min(0.0).sqrt()


def _field_forward(h: torch.Tensor, pos: torch.Tensor, val: torch.Tensor, tau: torch.Tensor, normalize: bool,
                   eps: float, fast: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dist = _field_dist_mm(h, pos) if fast else _field_dist(h, pos)
    w = torch.exp(-dist / (tau.abs() + 0.1))
    wn = w / (w.sum(-1, keepdim=True) + eps) if normalize else w
    return wn @ val, dist, w, wn


class _FieldFunction(torch.autograd.Function):
    """The field with a hand-written backward that computes parameter gradients for active neurons only.

    Autograd through the broadcast keeps a [B, S, N, D] difference tensor alive and
    reduces it again for every neuron's position gradient. The backward below needs
    only [B, S, N] tensors and matmuls (sum_j c_j (h - p_j) = h sum_j c_j - c @ p), and
    frozen neurons' rows are skipped: their gradients are exactly zero, as the spec's
    crystallisation wants, and their share of the work is not done at all.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, pos: torch.Tensor, val: torch.Tensor, tau: torch.Tensor,
                active: torch.Tensor, normalize: bool, eps: float, fast: bool) -> torch.Tensor:
        out, dist, w, wn = _field_forward(h, pos, val, tau, normalize, eps, fast)
        ctx.save_for_backward(h, pos, val, tau, active, dist, w, wn)
        ctx.normalize = normalize
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, pos, val, tau, active, dist, w, wn = ctx.saved_tensors
        d = h.shape[-1]
        g_wn = g @ val.t()                                            # [.., N]
        if ctx.normalize:
            g_w = (g_wn - (g_wn * wn).sum(-1, keepdim=True)) / (w.sum(-1, keepdim=True) + ctx.eps)
        else:
            g_w = g_wn
        a = tau.abs() + 0.1
        gw_w = g_w * w
        g_dist = -gw_w / a
        # d dist / d diff = diff / dist; a query sitting exactly on a neuron has no direction: 0.
        c = torch.where(dist > 0, g_dist / dist.clamp_min(torch.finfo(dist.dtype).tiny), torch.zeros_like(dist))
        g_h = h * c.sum(-1, keepdim=True) - c @ pos if ctx.needs_input_grad[0] else None

        g_pos = g_val = g_tau = None
        idx = active.nonzero().squeeze(1)
        if idx.numel():
            hm = h.reshape(-1, d)
            cm = c.reshape(-1, c.shape[-1]).index_select(1, idx)      # [M, Na]
            if ctx.needs_input_grad[1]:
                pa = pos.index_select(0, idx)
                g_pos = torch.zeros_like(pos).index_copy_(0, idx, pa * cm.sum(0).unsqueeze(1) - cm.t() @ hm)
            if ctx.needs_input_grad[2]:
                wm = wn.reshape(-1, wn.shape[-1]).index_select(1, idx)
                g_val = torch.zeros_like(val).index_copy_(0, idx, wm.t() @ g.reshape(-1, d))
            if ctx.needs_input_grad[3]:
                s = (gw_w * dist).reshape(-1, dist.shape[-1]).index_select(1, idx).sum(0)
                ta = tau.index_select(0, idx)
                g_tau = torch.zeros_like(tau).index_copy_(0, idx, s / (ta.abs() + 0.1) ** 2 * torch.sign(ta))
        else:
            g_pos = torch.zeros_like(pos) if ctx.needs_input_grad[1] else None
            g_val = torch.zeros_like(val) if ctx.needs_input_grad[2] else None
            g_tau = torch.zeros_like(tau) if ctx.needs_input_grad[3] else None
        return g_h, g_pos, g_val, g_tau, None, None, None, None


class NeuronField(nn.Module):
    """Neurons as points in embedding space, queried by distance.

    Frozen (crystallised) neurons take no gradient. While training, the field runs
    through _FieldFunction, whose backward computes parameter gradients only for
    active neurons (frozen rows are exact zeros, and their work is skipped); the
    forward's numbers are the same in training and inference.

    `fast_distance` (off by default; the trainer turns it on) computes distances
    with one matmul instead of the spec's broadcast difference: ~50x faster, equal
    up to rounding that cancellation amplifies near a neuron (see _field_dist_mm).
    It is a runtime switch, not part of the checkpoint.
    """

    fast_distance: bool = False
    frozen: torch.Tensor  # a buffer: saved with the checkpoint, never trained

    def __init__(self, n: int, d: int, normalize: bool = True, eps: float = 1e-8) -> None:
        super().__init__()
        self.normalize = normalize
        self.eps = eps
        self.positions = nn.Parameter(torch.randn(n, d) * 0.5)
        self.values = nn.Parameter(torch.randn(n, d) * 0.02)
        self.temperature = nn.Parameter(torch.ones(n))
        self.register_buffer("frozen", torch.zeros(n, dtype=torch.bool))

    @property
    def n_neurons(self) -> int:
        return self.positions.shape[0]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.n_neurons == 0:
            return torch.zeros_like(h)
        params = (self.positions, self.values, self.temperature)
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in params)):
            return _FieldFunction.apply(h, *params, ~self.frozen, self.normalize, self.eps, self.fast_distance)
        return _field_forward(h, *params, self.normalize, self.eps, self.fast_distance)[0]


class FFN(nn.Module):
    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, f)
        self.fc2 = nn.Linear(f, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, n_neurons: int) -> None:
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.attn = CausalSelfAttention(d, cfg.n_heads)
        self.ln2 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.field = NeuronField(n_neurons, d, cfg.field_norm, cfg.field_eps)
        self.ln3 = nn.LayerNorm(d, eps=cfg.ln_eps)
        self.ffn = FFN(d, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        x = x + self.field(self.ln2(x))
        return x + self.ffn(self.ln3(x))


class Head(nn.Module):
    def __init__(self, v: int, d: int, tied: bool) -> None:
        super().__init__()
        if not tied:
            self.weight = nn.Parameter(torch.randn(v, d) * 0.02)
        self.bias = nn.Parameter(torch.zeros(v))


class CrystalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.config = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, n) for n in cfg.n_neurons)
        if cfg.final_norm:
            self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.ln_eps)
        self.head = Head(cfg.vocab_size, cfg.d_model, cfg.tie_head)

    @property
    def fields(self) -> list[NeuronField]:
        """Each block's neuron field, in block order (the trainer's growth and freezing work on these)."""
        return [cast(Block, b).field for b in self.blocks]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, S] -> logits [B, S, V]."""
        s = ids.shape[-1]
        pos = torch.arange(s, device=ids.device)
        x = self.token_embed(ids) + self.pos_embed(pos)
        for blk in self.blocks:
            x = blk(x)
        if self.config.final_norm:
            x = self.ln_f(x)
        w = self.token_embed.weight if self.config.tie_head else self.head.weight
        return F.linear(x, w, self.head.bias)


def checkpoint_dict(
    model: CrystalLM, tokenizer: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    ckpt: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer
    return ckpt


def save_checkpoint(
    path: str, model: CrystalLM, tokenizer: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> None:
    from crystalc.fsutil import atomic_file

    with atomic_file(path) as f:
        try:
            torch.save(checkpoint_dict(model, tokenizer, meta), f)
        except RuntimeError as e:  # torch's zip writer reports the file's OSError (a full disk) as this
            cause = e.__cause__ or e.__context__
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(e).splitlines()[0]
            raise CrystalError(f"{path}: writing the checkpoint failed ({why}); nothing written") from None


def model_from_graph(graph: Graph) -> CrystalLM:
    """A CrystalLM holding a graph's (dequantized) weights."""
    model = CrystalLM(graph.config)
    sd = {k: torch.from_numpy(v.copy()) for k, v in graph.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model
