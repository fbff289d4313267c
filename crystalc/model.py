"""CrystalLM: the spec's forward pass in PyTorch, under the canonical parameter names."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from crystalc.config import ModelConfig

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


class NeuronField(nn.Module):
    """Neurons as points in embedding space, queried by distance.

    Frozen (crystallised) neurons take no gradient: their parameters are read
    through `detach()`, so autograd neither computes nor stores anything for them.
    """

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

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frozen = self.frozen
        if not self.training or not bool(frozen.any()):
            return self.positions, self.values, self.temperature

        def mix(p: torch.Tensor) -> torch.Tensor:
            m = frozen.view(-1, *([1] * (p.dim() - 1)))
            return torch.where(m, p.detach(), p)

        return mix(self.positions), mix(self.values), mix(self.temperature)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.n_neurons == 0:
            return torch.zeros_like(h)
        pos, val, tau = self._params()
        diff = h.unsqueeze(-2) - pos
        dist = torch.sqrt((diff * diff).sum(-1))
        w = torch.exp(-dist / (tau.abs() + 0.1))
        if self.normalize:
            w = w / (w.sum(-1, keepdim=True) + self.eps)
        return w @ val


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
        torch.save(checkpoint_dict(model, tokenizer, meta), f)


def model_from_graph(graph: Any) -> CrystalLM:
    """A CrystalLM holding a graph's (dequantized) weights."""
    model = CrystalLM(graph.config)
    sd = {k: torch.from_numpy(v.copy()) for k, v in graph.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    return model
