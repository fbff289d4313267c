"""The crystalc benchmark: generated C against PyTorch eager and ONNX Runtime, one thread, greedy.

    .venv/bin/python bench/run.py            # the real run: writes bench/results.md and bench/results.png
    .venv/bin/python bench/run.py --quick    # few repetitions, for developing the harness (writes to bench/work/)

Everything it builds (the random checkpoint, the ONNX export, the compiled programs,
results.json) goes to bench/work/, which git ignores. bench/README.md explains each number.
"""

from __future__ import annotations

import os

import proc

# Before numpy, torch or onnxruntime start their thread pools.
os.environ.update(proc.SINGLE_THREAD_ENV)

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cprog  # noqa: E402
import numpy as np  # noqa: E402
import report  # noqa: E402
import sampling  # noqa: E402
import torch  # noqa: E402
import torch_gen  # noqa: E402
import workload  # noqa: E402

from crystalc.config import ModelConfig  # noqa: E402
from crystalc.model import CrystalLM, model_from_graph  # noqa: E402

HERE = Path(__file__).resolve().parent
MODES = (None, "mixed8")


def load_torch(path: Path) -> CrystalLM:
    ckpt = torch.load(path, weights_only=True)
    model = CrystalLM(ModelConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def graphs(ckpt: Path) -> dict[str, object]:
    from crystalc.frontend import load_model
    from crystalc.passes.quantize import quantize

    g = load_model(str(ckpt))
    return {"f32": g, "mixed8": quantize(g, "mixed8", "tensor")}


def yardstick(work: Path) -> dict:
    c = workload.CONFIG
    argv = [sys.executable, str(HERE / "blas_peak.py"), str(c.vocab_size), str(c.d_model), str(c.n_ctx),
            str(c.n_neurons[0]), str(c.ffn_hidden)]
    out = json.loads(subprocess.run(argv, env=proc.child_env(), capture_output=True, text=True, check=True).stdout)
    # One scalar expf, from C: plain -O2, so every call is glibc's expf.
    exe = work / "expf_cost"
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", str(exe), str(HERE / "expf_cost.c"), "-lm"], check=True)
    out["expf_scalar_ns"] = float(proc.check(proc.run([str(exe)]), "expf_cost").stdout)
    return out


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True).stdout.splitlines()
    import onnxruntime

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": np.__version__, "gcc": gcc[0] if gcc else "?",
            "kernel": platform.release()}


def git_state() -> str:
    """The commit measured, and whether the C backend's files differ from it."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "crystalc", "backends", "templates",
                                "bench"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" with uncommitted changes in crystalc/, backends/, templates/ or bench/" if dirty else "")


def build_c(ckpt: Path, work: Path, reps: int) -> dict:
    out = {}
    for mode in MODES:
        tag = mode or "f32"
        print(f"[bench] crystalc compile --target c{' --quantize ' + mode if mode else ''} --build", flush=True)
        try:
            b = cprog.compile_and_build(ckpt, work, mode, reps)
            out[tag] = {"binary": str(b.binary), "compile_s": b.compile_s, "build_s": b.build_s,
                        "source_bytes": b.source_bytes, "data_bytes": b.data_bytes, "binary_bytes": b.binary_bytes,
                        "files": b.files}
        except RuntimeError as e:
            out[tag] = {"error": str(e).splitlines()[-1][-300:]}
            print(f"[bench]   not available: {out[tag]['error']}", flush=True)
    return out


def regime(builds: dict, prompt: list[int], n_short: int, n_long: int, shift: int, baselines: dict,
           rounds: int) -> dict:
    """Every C build and every baseline, sampled in the same rounds."""
    samplers: dict = {f"c/{tag}": sampling.CProgram(Path(b["binary"]), prompt, n_short, n_long, shift)
                      for tag, b in builds.items()}
    samplers.update({name: sampling.InProcess(make, n_short) for name, make in baselines.items()})
    got = sampling.measure(samplers, rounds)
    out: dict = {"c": {tag: got[f"c/{tag}"] for tag in builds}}
    out.update({name: got[name] for name in baselines})
    return out


def agreement(a: list[int], b: list[int]) -> str:
    if len(a) != len(b):
        return f"different lengths: {len(a)} and {len(b)} tokens"
    n = len(a)
    first = next((i for i in range(n) if a[i] != b[i]), None)
    return f"{n}/{n} identical" if first is None else f"first difference at token {first} of {n}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions (developing the harness)")
    ap.add_argument("--work", type=Path, default=HERE / "work")
    ap.add_argument("--results", type=Path, default=None, help="default bench/results.md (--quick: bench/work/)")
    ap.add_argument("--plot", type=Path, default=None, help="default bench/results.png (--quick: bench/work/)")
    args = ap.parse_args()
    # A quick run's numbers are not for quoting: they never replace the committed results by default.
    out_dir = args.work if args.quick else HERE
    args.results = args.results or out_dir / "results.md"
    args.plot = args.plot or out_dir / "results.png"
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    # Rounds of samples per regime (each round: one sample of every implementation); cold-start launches.
    rounds, reps_cold = (2, 1) if args.quick else (11, 7)
    res: dict = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
                 "machine": machine(), "git": git_state(), "load_before": os.getloadavg(), "quick": args.quick,
                 "reps": {"rounds": rounds, "cold": reps_cold},
                 "config": workload.CONFIG.to_dict(), "seed": workload.SEED}
    work = args.work
    ckpt = workload.make_checkpoint(work / "model.pt")
    model = load_torch(ckpt)
    gs = graphs(ckpt)
    res["tensor_bytes"] = {tag: {t.name: t.nbytes for t in g.tensors()} for tag, g in gs.items()}
    p1, p64 = workload.prompts()
    t, w, m = workload.CONFIG.n_ctx, workload.WINDOW_TOKENS, workload.PAST_TOKENS
    warm = workload.PAST_WARM

    print("[bench] yardstick: OpenBLAS single-thread SGEMM / SGEMV", flush=True)
    res["yardstick"] = yardstick(work)
    res["c_build"] = build_c(ckpt, work, 1 if args.quick else 3)
    builds = {k: v for k, v in res["c_build"].items() if "error" not in v}
    # The token check for mixed8: PyTorch on the dequantized mixed8 weights (the same numbers the C computes with).
    ref_models = {"f32": model, "mixed8": model_from_graph(gs["mixed8"]).eval()}

    regimes: dict = {}
    print("[bench] within the window", flush=True)
    # The first token comes from the prompt's own forward on every side: time the 63 after it.
    int8 = torch_gen.int8_dynamic(model)
    regimes["window"] = regime(builds, p1, 1, w, 1, {
        "torch": lambda: torch_gen.generate_recompute(model, p1, w),
        "torch_full": lambda: torch_gen.generate_full_logits(model, p1, w),
        "torch_kv": lambda: torch_gen.generate_kv(model, p1, w),
        "torch_int8_kv": lambda: torch_gen.generate_kv(int8, p1, w)}, rounds)

    print("[bench] past the window, --shift 1", flush=True)
    sess = torch_gen.ort_session(torch_gen.export_onnx(model, work / "model.onnx"))
    sess_pruned = torch_gen.ort_session(torch_gen.export_onnx(model, work / "model-pruned.onnx", pruned=True))
    # ONNX Runtime's own int8 path (quantize_dynamic of the same exports): C mixed8's ONNX Runtime baseline.
    sess_int8 = torch_gen.ort_session(torch_gen.quantize_onnx_int8(work / "model.onnx", work / "model-int8.onnx"))
    sess_int8_pruned = torch_gen.ort_session(
        torch_gen.quantize_onnx_int8(work / "model-pruned.onnx", work / "model-pruned-int8.onnx"))
    regimes["shift1"] = regime(builds, p64, warm, warm + m, 1, {
        "torch": lambda: torch_gen.generate_recompute(model, p64, warm + m, 1),
        "ort": lambda: torch_gen.generate_ort_window(sess, t, p64, warm + m),
        "torch_pruned": lambda: torch_gen.generate_recompute_pruned(model, p64, warm + m, 1),
        "ort_pruned": lambda: torch_gen.generate_ort_window(sess_pruned, t, p64, warm + m),
        "ort_int8": lambda: torch_gen.generate_ort_window(sess_int8, t, p64, warm + m),
        "ort_int8_pruned": lambda: torch_gen.generate_ort_window(sess_int8_pruned, t, p64, warm + m)}, rounds)

    print("[bench] past the window, --shift 32", flush=True)
    regimes["shift32"] = regime(builds, p64, warm, warm + m, 32, {
        "torch": lambda: torch_gen.generate_kv(model, p64, warm + m, 32),
        "torch_pruned": lambda: torch_gen.generate_kv(model, p64, warm + m, 32, pruned=True),
        "torch_int8_pruned": lambda: torch_gen.generate_kv(int8, p64, warm + m, 32, pruned=True)}, rounds)
    res["regimes"] = regimes
    for b in builds.values():
        b["maxrss_kb"] = proc.peak_rss_kb(cprog.argv(Path(b["binary"]), p64, warm + m, 1))

    # Same semantics on both sides: the C tokens against PyTorch's (f32 model, or the dequantized mixed8 one).
    checks = {}
    for name, (prompt, n, shift, fn) in {
        "window": (p1, w, 1, torch_gen.generate_recompute),
        "shift1": (p64, warm + m, 1, torch_gen.generate_recompute),
        "shift32": (p64, warm + m, 32, torch_gen.generate_kv),
    }.items():
        for tag, c in regimes[name]["c"].items():
            ref = regimes[name]["torch"]["tokens"] if tag == "f32" else list(fn(ref_models[tag], prompt, n, shift))
            checks[f"{name}/{tag}"] = agreement(c["tokens"], ref)
    for name in ("ort", "torch_pruned", "ort_pruned"):
        checks[f"shift1/{name}"] = agreement(regimes["shift1"][name]["tokens"], regimes["shift1"]["torch"]["tokens"])
    checks["window/torch_kv"] = agreement(regimes["window"]["torch_kv"]["tokens"], regimes["window"]["torch"]["tokens"])
    # its own int8 numerics (activations quantized too): close to mixed8's tokens, not equal to them
    checks["window/torch_int8_kv vs C mixed8"] = agreement(regimes["window"]["torch_int8_kv"]["tokens"],
                                                           regimes["window"]["c"].get("mixed8", {}).get("tokens", []))
    # so has ONNX Runtime's (activations quantized to uint8): against C mixed8's tokens, and float32 PyTorch's
    for name in ("ort_int8", "ort_int8_pruned"):
        got = regimes["shift1"][name]["tokens"]
        mixed8 = regimes["shift1"]["c"].get("mixed8", {}).get("tokens", [])
        checks[f"shift1/{name} vs C mixed8"] = agreement(got, mixed8)
        checks[f"shift1/{name} vs PyTorch f32"] = agreement(got, regimes["shift1"]["torch"]["tokens"])
    checks["shift32/torch_pruned"] = agreement(regimes["shift32"]["torch_pruned"]["tokens"],
                                               regimes["shift32"]["torch"]["tokens"])
    checks["shift32/torch_int8_pruned vs C mixed8"] = agreement(
        regimes["shift32"]["torch_int8_pruned"]["tokens"], regimes["shift32"]["c"].get("mixed8", {}).get("tokens", []))
    checks["shift32/torch-kv vs recompute"] = agreement(
        regimes["shift32"]["torch"]["tokens"],
        list(torch_gen.generate_recompute(model, p64, warm + m, 32)))
    res["checks"] = checks
    # the gate: a build whose logits are not the model's is reported as such and fails the run (its ratios
    # would be a fast answer to another question); the token checks above report, as near-ties may flip
    res["logit_errors"] = {tag: cprog.logit_error(Path(b["binary"]), ref_models[tag], p64)
                           for tag, b in builds.items()}

    print("[bench] cold start", flush=True)
    n = workload.COLD_TOKENS
    cold = {}
    for tag, b in builds.items():
        cold[tag] = cprog.cold(cprog.argv(Path(b["binary"]), p1, n, 1), reps_cold)
        cold[tag]["tokens"] = cold[tag]["tokens"][-n:]
    py = [sys.executable, str(HERE / "cold_torch.py"), str(ckpt), ",".join(map(str, p1)), str(n)]
    cold["torch"] = cprog.cold(py, reps_cold)
    for tag in builds:
        ref = cold["torch"]["tokens"] if tag == "f32" else list(torch_gen.generate_recompute(ref_models[tag], p1, n))
        checks[f"cold/{tag}"] = agreement(cold[tag]["tokens"], ref)
    res["cold"] = cold

    res["load_after"] = os.getloadavg()
    res["elapsed_s"] = time.perf_counter() - t_start
    report.derive(res)
    (work / ("results-quick.json" if args.quick else "results.json")).write_text(json.dumps(res, indent=1, default=str))
    args.results.write_text(report.markdown(res))
    report.plot(res, args.plot)
    print(f"[bench] wrote {args.results} and {args.plot} in {res['elapsed_s']:.0f} s", flush=True)
    wrong = {tag: e for tag, e in res["logit_errors"].items() if not e <= report.LOGIT_TOL}
    if wrong:
        sys.exit(f"[bench] the C {', '.join(wrong)} build's logits are off by {max(wrong.values()):.3g} (relative), "
                 f"past {report.LOGIT_TOL:g}: its speed is not the model's (targets marked unmet)")


if __name__ == "__main__":
    main()
