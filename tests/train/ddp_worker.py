"""Run by test_ddp under torchrun: train a tiny model for a few steps and save this rank's state.

`python -m tests.train.ddp_worker OUT [CASE]`: CASE `grow` (the default) grows and freezes; `no_field`
trains blocks of no neurons; `nan_on_rank1` makes rank 1's loss NaN at its third step (and only there).
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from crystalc.errors import CrystalError
from crystalc.train import loop
from crystalc.train.loop import TrainConfig, train
from tests.train.test_train import corpus


def main(out_dir: str, case: str = "grow") -> None:
    cfg = TrainConfig(d_model=16, n_ctx=16, n_heads=2, neurons=4, max_neurons=12, steps=16, rounds=8, batch_size=4,
                      lr=1e-2, warmup=2, grow_every=2, freeze_every=2, freeze_min_age=2, eval_every=4,
                      eval_windows=8, seed=3, threads=1, progress=False)
    rank = int(os.environ["RANK"])
    if case == "no_field":
        cfg = dataclasses.replace(cfg, neurons=0, max_neurons=0, growth="none", steps=4)
    elif case == "nan_on_rank1":
        calls = 0
        real = loop.F.cross_entropy

        def cross_entropy(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            loss = real(*args, **kwargs)
            return loss * float("nan") if rank == 1 and calls == 3 else loss

        loop.F.cross_entropy = cross_entropy  # type: ignore[assignment]
        try:
            train(corpus(120), cfg, out=os.path.join(out_dir, "model.pt"))
        except CrystalError as e:
            print(f"rank {rank}: {e}", flush=True)
            return
        raise SystemExit(f"rank {rank}: training did not stop")
    elif case != "grow":
        raise SystemExit(f"unknown case {case!r}")
    model, _, meta = train(corpus(120), cfg, out=os.path.join(out_dir, "model.pt"))
    torch.save({"model": model.state_dict(), "meta": meta}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
