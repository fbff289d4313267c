"""Measure what frozen neurons save in training: one NeuronField forward + backward.

    .venv/bin/python scripts/field_speed.py [--threads 1] [--repeat 9]

Compares three ways to train the field on the same inputs:
  autograd-where  autograd through the spec's broadcast formula, frozen rows detached
                  with torch.where (crystalc before the hand-written backward)
  exact           NeuronField with the hand-written backward, spec's distance formula
  fast            the same with fast_distance (what `crystalc train` runs)
for several frozen fractions, and prints the fastest forward+backward and backward of the repeats (ms) as a table.
With one thread the clock is this process's CPU time, which other processes on a
shared machine disturb far less than wall time; the minimum discards the repeats
that were disturbed anyway.
"""

from __future__ import annotations

import argparse
import time

import torch

from crystalc.model import NeuronField


def autograd_where(f: NeuronField, h: torch.Tensor) -> torch.Tensor:
    m = f.frozen

    def mix(p: torch.Tensor) -> torch.Tensor:
        return torch.where(m.view(-1, *([1] * (p.dim() - 1))), p.detach(), p)

    pos, val, tau = mix(f.positions), mix(f.values), mix(f.temperature)
    diff = h.unsqueeze(-2) - pos
    w = torch.exp(-torch.sqrt((diff * diff).sum(-1)) / (tau.abs() + 0.1))
    w = w / (w.sum(-1, keepdim=True) + f.eps)
    return w @ val


clock = time.perf_counter


def time_step(fn, f: NeuronField, h: torch.Tensor, repeat: int) -> tuple[float, float]:
    """Fastest (forward + backward, backward alone) in ms."""
    g = torch.randn(h.shape, generator=torch.Generator().manual_seed(1))
    total, back = [], []
    for i in range(repeat + 1):
        f.zero_grad(set_to_none=True)
        h.grad = None
        t0 = clock()
        out = fn(f, h)
        t1 = clock()
        out.backward(g)
        t2 = clock()
        if i:  # the first call warms up allocators and kernels
            total.append(t2 - t0)
            back.append(t2 - t1)
    return min(total) * 1e3, min(back) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=64)
    ap.add_argument("--d", type=int, default=96)
    ap.add_argument("--n", type=int, default=256)
    args = ap.parse_args()
    global clock
    torch.set_num_threads(args.threads)
    if args.threads == 1:
        clock = time.process_time
    torch.manual_seed(0)
    f = NeuronField(args.n, args.d)
    h = torch.randn(args.batch, args.ctx, args.d, requires_grad=True)
    print(f"B {args.batch}, T {args.ctx}, D {args.d}, N {args.n}, {args.threads} threads; "
          f"fastest of {args.repeat} ({'CPU' if args.threads == 1 else 'wall'} time), ms per forward+backward")
    print("| frozen | autograd-where | exact | fast | backward: autograd-where | exact | fast |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for frac in (0.0, 0.5, 0.9, 1.0):
        f.frozen.zero_()
        f.frozen[: int(round(frac * args.n))] = True
        f.fast_distance = False
        a = time_step(autograd_where, f, h, args.repeat)
        e = time_step(lambda m, x: m(x), f, h, args.repeat)
        f.fast_distance = True
        s = time_step(lambda m, x: m(x), f, h, args.repeat)
        print(f"| {frac:.0%} | {a[0]:.1f} | {e[0]:.1f} | {s[0]:.1f} | {a[1]:.1f} | {e[1]:.1f} | {s[1]:.1f} |")


if __name__ == "__main__":
    main()
