"""Train the bundled Shakespeare crystal: a char-level model in about 20 minutes on 2 CPU cores.

    .venv/bin/python examples/shakespeare/train.py [--data PATH] [--out PATH] [--steps N]

By default the corpus is the repository's copy, tests/data/tinyshakespeare.txt
(the project's shared corpus, byte for byte). The settings below are the
ones the committed model.pt was trained with (see README.md); the same command
gives the same checkpoint, byte for byte, on the same torch and thread count.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from crystalc.errors import CrystalError
from crystalc.train.data import read_corpus
from crystalc.train.loop import TrainConfig, train

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "tests" / "data" / "tinyshakespeare.txt"

# D 128, T 64, one block: the seeds' causal crystal, with 4,000 steps to fit two shared cores.
# Neurons grow from 64 to 320 by splitting (every 10 of 600 rounds, until 80%);
# the graceful schedule freezes from 20% on. Warm-up: train's default, 100 steps (a tenth of a shorter run).
CONFIG = dict(d_model=128, n_ctx=64, n_heads=4, n_blocks=1, neurons=64, max_neurons=320, steps=4000,
              rounds=600, batch_size=32, lr=3e-3, eval_every=25, eval_windows=128,
              val_frac=0.1, tokenizer="char", seed=1337, threads=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="tinyshakespeare.txt (default: %(default)s)")
    ap.add_argument("--out", default=str(HERE / "model.pt"), help="checkpoint to write (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=CONFIG["steps"], help="optimizer steps (default: %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="log a line per evaluation instead of a bar")
    args = ap.parse_args()
    cfg = TrainConfig(**{**CONFIG, "steps": args.steps, "progress": not args.no_progress})
    try:
        text = read_corpus(args.data)
        t0 = time.time()
        _, _, meta = train(text, cfg, out=args.out, log=lambda s: print(s, flush=True))
    except CrystalError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    last = meta["curve"][-1]
    print(f"wrote {args.out}: {time.time() - t0:.0f} s, val loss {last['val_loss']:.4f}, "
          f"{sum(last['neurons'])} neurons, {last['frozen_pct']:.1f}% frozen", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
