"""Per-neuron bookkeeping that growth and freezing decide from.

Everything here is derived from gradients after they are averaged across ranks
(and from a fixed probe batch), so every rank of a data-parallel run holds the
same numbers and takes the same decisions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HISTORY = 10  # gradient-norm readings kept per neuron (the seeds' "last 10")


@dataclass
class FieldStats:
    grad_ema: torch.Tensor   # [N] EMA (0.9) of the per-step position-gradient norm: "heat"
    history: torch.Tensor    # [N, HISTORY] per-round mean gradient norms, oldest first
    n_readings: torch.Tensor  # [N] how many of `history` are real
    birth: torch.Tensor      # [N] round a neuron was born in
    round_sum: torch.Tensor  # [N] gradient norms summed over the current round
    round_steps: int = 0

    @classmethod
    def new(cls, n: int, birth_round: int = 0) -> FieldStats:
        return cls(torch.zeros(n), torch.zeros(n, HISTORY), torch.zeros(n, dtype=torch.long),
                   torch.full((n,), birth_round, dtype=torch.long), torch.zeros(n))

    @property
    def n(self) -> int:
        return self.grad_ema.shape[0]

    def observe(self, pos_grad: torch.Tensor | None, ema: float = 0.9) -> None:
        """One optimizer step's position gradients [N, D]."""
        if self.n == 0:
            return
        norm = torch.zeros(self.n) if pos_grad is None else pos_grad.detach().float().norm(dim=1).cpu()
        self.grad_ema.mul_(ema).add_(norm, alpha=1 - ema)
        self.round_sum.add_(norm)
        self.round_steps += 1

    def end_round(self) -> None:
        """Close a round: its mean gradient norm becomes one history reading."""
        if self.n == 0 or self.round_steps == 0:
            return
        reading = self.round_sum / self.round_steps
        self.history = torch.cat([self.history[:, 1:], reading.unsqueeze(1)], dim=1)
        self.n_readings.add_(1).clamp_(max=HISTORY)
        self.round_sum.zero_()
        self.round_steps = 0

    def append_children(self, parents: torch.Tensor, birth_round: int) -> None:
        """Children start with half their parent's heat (so does the parent) and no history."""
        self.grad_ema[parents] *= 0.5
        k = len(parents)
        self.grad_ema = torch.cat([self.grad_ema, self.grad_ema[parents]])
        self.history = torch.cat([self.history, torch.zeros(k, HISTORY)])
        self.n_readings = torch.cat([self.n_readings, torch.zeros(k, dtype=torch.long)])
        self.birth = torch.cat([self.birth, torch.full((k,), birth_round, dtype=torch.long)])
        self.round_sum = torch.cat([self.round_sum, torch.zeros(k)])

    def state(self) -> dict[str, torch.Tensor]:
        return {"grad_ema": self.grad_ema, "history": self.history, "n_readings": self.n_readings,
                "birth": self.birth}
