"""Growth: split the hottest non-frozen neurons.

Heat is the EMA (0.9) of a neuron's position-gradient norm: a neuron the loss keeps
pulling on is at the frontier and wants more capacity there. A split adds a child
at the parent's position plus Gaussian noise (sigma 0.1) with the parent's
temperature; the parent's value is shared out: the child gets half of it and the
parent keeps the other half (the seeds' journals say the child takes "half the
value"; halving the parent too conserves the summed value, which keeps an
unnormalised field's output exactly at zero noise). The normalised field, a
weighted average, moves under any split, and more under this rule than under the
other reading (docs/training.md). `halve_parent=False` gives the child half the
value and leaves the parent alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from crystalc.model import NeuronField
from crystalc.train.stats import FieldStats


def hottest(stats: FieldStats, frozen: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k hottest non-frozen neurons (ties broken by index: deterministic)."""
    heat = stats.grad_ema.clone()
    heat[frozen.cpu()] = -float("inf")
    k = min(k, int((~frozen).sum()))
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    order = torch.sort(heat, descending=True, stable=True).indices
    return order[:k]


def split(field: NeuronField, parents: torch.Tensor, gen: torch.Generator, noise: float = 0.1,
          halve_parent: bool = True) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
    """Append one child per parent to a NeuronField; returns {name: (old param, new param)}."""
    with torch.no_grad():
        pos, val, tau = field.positions, field.values, field.temperature
        p_idx = parents.to(pos.device)
        eps = torch.randn(len(parents), pos.shape[1], generator=gen).to(pos)
        child_pos = pos[p_idx] + noise * eps
        child_val = val[p_idx] * 0.5
        new_val = val.detach().clone()
        if halve_parent:
            new_val[p_idx] *= 0.5
        new = {
            "positions": torch.cat([pos.detach(), child_pos]),
            "values": torch.cat([new_val, child_val]),
            "temperature": torch.cat([tau.detach(), tau[p_idx]]),
        }
        field.frozen = torch.cat([field.frozen, torch.zeros(len(parents), dtype=torch.bool, device=pos.device)])
    swaps = {}
    for name, data in new.items():
        old = getattr(field, name)
        p = nn.Parameter(data.contiguous())
        setattr(field, name, p)
        swaps[name] = (old, p)
    return swaps


def remap_optimizer(opt: torch.optim.Optimizer, swaps: dict[str, tuple[nn.Parameter, nn.Parameter]],
                    parents: torch.Tensor) -> None:
    """Point the optimizer at the grown parameters; children inherit their parent's moments."""
    for old, new in swaps.values():
        for group in opt.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        st: dict[str, Any] = opt.state.pop(old, {})
        if not st:
            continue
        idx = parents.to(old.device)
        moved = {}
        for key, v in st.items():
            if torch.is_tensor(v) and v.shape == old.shape:
                moved[key] = torch.cat([v, v[idx]])
            else:
                moved[key] = v
        opt.state[new] = moved
