"""The machine's single-thread yardstick: OpenBLAS (through numpy) matrix products.

Run as a script in a child process so that OPENBLAS_NUM_THREADS=1 is set before
OpenBLAS starts (bench/run.py does this); prints one JSON object. Each figure is the
best of several timed repetitions after a warm-up call (a peak is what the machine can
reach: interference from other jobs only ever slows a repetition down), timed by this
process's CPU time like the rates it is compared with (the cores are shared; see
bench/README.md).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np


def _best_s(fn, reps: int, inner: int = 1) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.process_time()
        for _ in range(inner):
            fn()
        times.append((time.process_time() - t0) / inner)
    return min(times)


def measure(vocab: int, d: int, n_ctx: int, neurons: int, ffn: int) -> dict:
    rng = np.random.default_rng(0)
    out: dict = {"threads_env": os.environ.get("OPENBLAS_NUM_THREADS"), "numpy": np.__version__}
    try:
        out["blas"] = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # the config layout is numpy's, not ours: the name is a courtesy
        out["blas"] = "unknown"

    # Peak compute: a large square SGEMM.
    n = 1024
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t = _best_s(lambda: a @ b, 5)
    out["sgemm_1024"] = {"s": t, "gflops": 2 * n**3 / t / 1e9}

    # The model's own small products (the window recompute): activations [T, D] times weights.
    shapes = {"qkv_out": (n_ctx, d, d), "field": (n_ctx, d, neurons), "ffn": (n_ctx, d, ffn)}
    for name, (m, k, nn) in shapes.items():
        x = rng.standard_normal((m, k), dtype=np.float32)
        w = rng.standard_normal((k, nn), dtype=np.float32)
        t = _best_s(lambda x=x, w=w: x @ w, 7, inner=50)
        out[f"sgemm_{name}"] = {"shape": [m, k, nn], "s": t, "gflops": 2 * m * k * nn / t / 1e9}

    # Peak bandwidth where the model lives: the head's matrix-vector product (the whole
    # float32 model fits in L3, so this is the memory level the weights stream from).
    w = rng.standard_normal((vocab, d), dtype=np.float32)
    x = rng.standard_normal(d, dtype=np.float32)
    t = _best_s(lambda: w @ x, 9, inner=20)
    out["sgemv_head"] = {"shape": [vocab, d], "s": t, "gbs": w.nbytes / t / 1e9, "gflops": 2 * vocab * d / t / 1e9}

    # Vectorised exp (numpy's SIMD loops) on the field's count of arguments per window.
    args = -np.linspace(0, 40, n_ctx * neurons, dtype=np.float32)
    t = _best_s(lambda: np.exp(args), 9, inner=20)
    out["exp_numpy"] = {"n": args.size, "s": t, "ns_each": t / args.size * 1e9}

    # For reference: a matrix far larger than L3 streams from DRAM.
    big = rng.standard_normal((6144, 6144), dtype=np.float32)
    xb = rng.standard_normal(6144, dtype=np.float32)
    t = _best_s(lambda: big @ xb, 5)
    out["sgemv_dram"] = {"shape": [6144, 6144], "s": t, "gbs": big.nbytes / t / 1e9}
    return out


if __name__ == "__main__":
    v, d, t, nn, f = (int(a) for a in sys.argv[1:6])
    print(json.dumps(measure(v, d, t, nn, f)))
