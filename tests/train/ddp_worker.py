"""Run by test_ddp under torchrun: train a tiny model for a few steps and save this rank's state."""

from __future__ import annotations

import os
import sys

import torch

from crystalc.train.loop import TrainConfig, train
from tests.train.test_train import corpus


def main(out_dir: str) -> None:
    cfg = TrainConfig(d_model=16, n_ctx=16, n_heads=2, neurons=4, max_neurons=12, steps=16, rounds=8, batch_size=4,
                      lr=1e-2, warmup=2, grow_every=2, freeze_every=2, freeze_min_age=2, eval_every=4,
                      eval_windows=8, seed=3, threads=1, progress=False)
    model, _, meta = train(corpus(120), cfg, out=os.path.join(out_dir, "model.pt"))
    rank = int(os.environ["RANK"])
    torch.save({"model": model.state_dict(), "meta": meta}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
