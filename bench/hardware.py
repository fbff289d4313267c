"""The Verilog core's cost per token, against PyTorch and ONNX Runtime on this CPU, in one run.

    .venv/bin/python bench/hardware.py            # the bundled model; writes bench/hardware.md
    .venv/bin/python bench/hardware.py --quick    # fewer repetitions; writes bench/work/hardware.md
    (--work DIR: builds and simulations there instead of bench/work)

A simulation has no speed of its own, so the core is measured in clock cycles (Verilator
simulates it, cycle-exactly, and the testbench counts them), and the ratio printed is the
**break-even clock**: the frequency at which the core, one multiply-accumulate a cycle,
would generate as fast as the baseline does on one CPU thread here (cycles a token x the
baseline's tokens a second). No clock is assumed: whether a given FPGA reaches it is
for its timing report to say. The baselines are bench/torch_gen.py's, one thread, greedy,
the same generation semantics, and their tokens are checked against the interpreter's.
"""

from __future__ import annotations

import os

import proc

os.environ.update(proc.SINGLE_THREAD_ENV)  # before numpy, torch or onnxruntime start their pools

import argparse  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import sampling  # noqa: E402
import torch  # noqa: E402
import torch_gen  # noqa: E402

from crystalc.backends import fixedpoint, verilog  # noqa: E402
from crystalc.frontend import load_model  # noqa: E402
from crystalc.ir.interpret import generate  # noqa: E402
from crystalc.model import model_from_graph  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODEL = REPO / "examples" / "shakespeare" / "model.pt"
OPS = ("token_embedding", "layer_norm", "linear", "causal_attention", "neuron_field", "gelu")
LANES = (1, 4, 16)  # the core's multiply-accumulate lanes for linear layers and the field (crystalc compile --lanes)


def per_token_cpu(make_gen: Callable[[], Iterator[int]], skip: int, reps: int) -> tuple[float, list[list[int]]]:
    """The median over `reps` generations (after one untimed, to warm up) of the CPU seconds a token
    after the first `skip`, and every generation's tokens."""
    list(make_gen())
    runs = [sampling.timed(make_gen(), skip) for _ in range(reps)]
    return proc.median([cpu / (len(toks) - skip) for toks, cpu, _ in runs]), [toks for toks, _, _ in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 PyTorch repetition (the Verilator builds stay); writes "
                                                         "WORK/hardware.md")
    ap.add_argument("--work", type=Path, default=HERE / "work",
                    help="folder for the builds and simulations (default bench/work)")
    args = ap.parse_args()
    reps = 1 if args.quick else 5
    torch.set_num_threads(1)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)

    graph = load_model(MODEL)
    t = graph.config.n_ctx
    prompt = [graph.tokenizer["chars"].index(c) for c in "ROMEO:\n"]
    window = (prompt * t)[:t]  # the baselines' past-the-window prompt: a full window
    kv_cycles: dict[int, float] = {}  # lanes -> cycles a token through the KV cache, positions 1..63
    window_cycles: dict[int, float] = {}  # lanes -> cycles of all 64 positions (--shift 1 past the window)
    build_s = 0.0
    for lanes in LANES:
        hw = work / f"hardware-{lanes}"
        if hw.exists():
            shutil.rmtree(hw)
        hw.mkdir()
        verilog.BACKEND.emit(graph, hw, lanes=lanes)
        build_start = time.perf_counter()
        verilog.BACKEND.build(hw, simulator="verilator")
        build_s = max(build_s, time.perf_counter() - build_start)
        # the hardware generating (crystal_gen: each token's logits compared, the window shifted when
        # full): tokens 2..t cost positions 1..t-1, and each token past the window all t positions again
        made = {n: verilog.simulate(hw, prompt[:1], simulator="verilator", generate=n) for n in (1, t, t + 4)}
        for n, (tokens, _) in made.items():
            assert tokens.tolist() == generate(graph, prompt[:1], n), "the hardware's tokens differ"
        kv_cycles[lanes] = (made[t][1] - made[1][1]) / (t - 1)
        window_cycles[lanes] = (made[t + 4][1] - made[t][1]) / 4

    model = model_from_graph(graph).eval()
    rows: list[tuple[str, str, float, dict[int, float]]] = []
    with torch.no_grad():
        want = generate(graph, prompt[:1], t)
        kv_s, kv = per_token_cpu(lambda: torch_gen.generate_kv(model, prompt[:1], t), 1, reps)
        assert all(toks == want for toks in kv), "PyTorch's KV-cache tokens differ from the interpreter's"
        rows.append(("within the window (KV cache), positions 1..63", "PyTorch eager, KV cache", kv_s, kv_cycles))
        n = 64
        want = generate(graph, window, n)
        # the core recomputes every position of the window in full: so do these baselines (not the pruned
        # forms bench/run.py compares the C with, which skip the last block's dead rows)
        rec_s, rec = per_token_cpu(lambda: torch_gen.generate_recompute(model, window, n), 0, reps)
        assert all(toks == want for toks in rec), "PyTorch's tokens differ from the interpreter's"
        rows.append(("past the window, --shift 1 (64 positions a token)", "PyTorch eager", rec_s, window_cycles))
        try:
            sess = torch_gen.ort_session(torch_gen.export_onnx(model, work / "hardware.onnx", pruned=False))
            ort_s, ort = per_token_cpu(lambda: torch_gen.generate_ort_window(sess, t, window, n), 0, reps)
            assert all(toks == want for toks in ort), "ONNX Runtime's tokens differ from the interpreter's"
            rows.append(("past the window, --shift 1 (64 positions a token)", "ONNX Runtime", ort_s, window_cycles))
        except ImportError as e:
            rows.append(("past the window, --shift 1", f"ONNX Runtime not available ({e})", float("nan"), {}))

    lines = [
        "# The Verilog core against PyTorch and ONNX Runtime (bench/hardware.py)",
        "",
        f"Model: {MODEL.relative_to(REPO)} ({graph.config.summary()}). Core: crystalc's Q16.16 core, one",
        "multiply-accumulate a clock a lane, generating greedily (crystal_gen: a token's logits compared a clock "
        "each, the window shifted when full); cycles counted by its testbench under Verilator "
        f"(built in {build_s:.1f} s). Baselines: one CPU thread here, CPU time, median of {reps}.",
        "",
        "| regime | baseline | baseline ms/token | core lanes | core cycles/token | break-even clock |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for regime, base, secs, cycles_by_lanes in rows:
        for lanes, cycles in cycles_by_lanes.items():
            clock = cycles / secs / 1e6 if secs == secs and secs > 0 else float("nan")
            lines.append(f"| {regime} | {base} | {secs * 1e3:.3f} | {lanes} | {cycles:,.0f} | {clock:,.0f} MHz |")
    lines += ["", "Break-even clock: the frequency at which the core generates as fast as the baseline "
              "(cycles a token x the baseline's tokens a second).", "",
              "Where the cycles go within the window (positions 1..63; verilog.core_cycles, the core's state "
              "machine counted, which the tests hold to the simulation):", "",
              "| lanes | " + " | ".join(OPS) + " |", "|---:|" + "---:|" * len(OPS)]
    program = fixedpoint.lower(graph)
    for lanes in LANES:
        by_op: dict[str, int] = {}
        for pos in range(1, t):
            for op, n in verilog.core_cycles(program, lanes, pos).items():
                by_op[op] = by_op.get(op, 0) + n
        total = sum(by_op.values())
        lines.append(f"| {lanes} | " + " | ".join(f"{by_op.get(op, 0) / total:.0%}" for op in OPS) + " |")
    out = (work if args.quick else HERE) / "hardware.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
