"""The CUDA backend: nvcc builds every program here; the programs run where a GPU is.

This machine (and CI) has nvcc but no GPU, so the builds are checked everywhere
(with every warning an error) and the GPU parity tests skip with the reason; on a
machine with a GPU they run. The kernels themselves also run here: g++ compiles
crystal_forward.cu against cuda_on_cpu.h, which executes every block as real
threads with barriers for __syncthreads and warp exchanges for __shfl_down_sync,
so their indexing, reductions and synchronisation are checked on every shape
(not the GPU's own expf/erff/sqrtf or memory model: those need the GPU).

Tolerance, both ways: max abs logit error <= 1e-4, as for C: float32 throughout,
reductions in a different order than numpy (warp shuffles, block trees), expf,
erff and sqrtf within 2 ulp (the kernels' own multiply-adds unfused, --fmad=false), and
integer weights are dequantized on the host exactly as the IR.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from crystalc.backends.cuda import BACKEND
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool

TOL = 1e-4
STRICT_C = "-std=c99 -O2 -Wall -Wextra -Werror"
STRICT_NVCC = "-O3 -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror"
NO_GPU = "no usable CUDA GPU"


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("nvcc", "make", "cc")


def program(graph: Graph, out: Path) -> Path:
    out.mkdir(parents=True)
    BACKEND.emit(graph, out)
    res = subprocess.run(["make", "-s", "-C", str(out), "model", f"CFLAGS={STRICT_C}", f"NVCCFLAGS={STRICT_NVCC}"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr + res.stdout
    return out / "model"


def run_logits(exe: Path, ids: list[int], order: str = "forward") -> subprocess.CompletedProcess:
    """The program's --logits; `order`: the emulation's thread order (cuda_on_cpu.h), where it is emulated."""
    return subprocess.run([str(exe), "--prompt-ids", ",".join(map(str, ids)), "--logits"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "CUDA_ON_CPU_ORDER": order})


def gpu_seen() -> bool:
    """A GPU as the machine shows it, independently of the programs under test."""
    if Path("/dev/nvidia0").exists():
        return True
    try:
        res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return res.returncode == 0 and "GPU" in res.stdout


@pytest.fixture(scope="module")
def gpu(tmp_path_factory) -> bool:
    """Whether the programs run here. They say so themselves, so the machine is asked too: a program that
    reports no GPU where there is one (a driver older than the CUDA runtime, say) fails instead of
    skipping the GPU runs; CRYSTALC_REQUIRE_GPU=1 makes a machine without one fail as well."""
    exe = program(random_graph("all_on", seed=1), tmp_path_factory.mktemp("probe") / "out")
    res = run_logits(exe, [1])
    runs = not (res.returncode == 2 and NO_GPU in res.stderr)
    if not runs and (gpu_seen() or os.environ.get("CRYSTALC_REQUIRE_GPU") == "1"):
        pytest.fail(f"the machine has a GPU (or CRYSTALC_REQUIRE_GPU=1) but the program says: {res.stderr.strip()}")
    return runs


def parsed(res: subprocess.CompletedProcess) -> tuple[list[int], np.ndarray]:
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    return [int(r[0]) for r in rows], np.array([float(r[1]) for r in rows])


@pytest.mark.tool
@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_logits_match_the_interpreter(shape, tmp_path, gpu):
    g = random_graph(shape, seed=2)
    exe = program(g, tmp_path / "out")  # built here even without a GPU: nvcc and cc, warnings as errors
    if not gpu:
        pytest.skip("no GPU on this machine: built, not run")
    ids = np.random.default_rng(4).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    for n in (1, 2, len(ids)):
        _, got = parsed(run_logits(exe, ids[:n]))
        assert np.abs(got - forward(g, ids[:n])[-1]).max() <= TOL


@pytest.mark.tool
@pytest.mark.parametrize("mode,granularity", [("int8", "row"), ("int16", "group:5"), ("mixed8", "tensor")])
def test_quantized_pruned_graph(mode, granularity, tmp_path, gpu):
    keep = [0, 2, 3, 7, 11, 19, 30]
    g = quantize(prune_vocab(random_graph("tied_unnormalised", seed=3), None, keep), mode, granularity)
    exe = program(g, tmp_path / "out")
    if not gpu:
        pytest.skip("no GPU on this machine: built, not run")
    ids, got = parsed(run_logits(exe, [0, 2, 7, 30]))
    assert ids == keep
    assert np.abs(got - forward(g, g.to_current_ids([0, 2, 7, 30]))[-1]).max() <= TOL


@pytest.mark.tool
def test_greedy_generation_matches_the_interpreter(tmp_path, gpu):
    from crystalc.ir.interpret import generate

    g = random_graph("d40_h5", seed=5)
    exe = program(g, tmp_path / "out")
    if not gpu:
        pytest.skip("no GPU on this machine: built, not run")
    res = subprocess.run([str(exe), "--prompt-ids", "1,2,3", "-n", "30", "-t", "0", "--shift", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [int(t) for t in res.stdout.strip().split(",")] == generate(g, [1, 2, 3], 30, 3)


@pytest.mark.tool
def test_without_a_gpu_one_line_and_exit_2(tmp_path, gpu):
    if gpu:
        pytest.skip("this machine has a GPU")
    exe = program(random_graph("all_on", seed=6), tmp_path / "out")
    res = run_logits(exe, [1, 2])
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"{exe}: error: {NO_GPU}")
    # the command line is checked first: --help and a bad option answer without a GPU
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "--prompt-ids" in res.stdout + res.stderr, res.stderr
    res = subprocess.run([str(exe), "--prompt-ids", "1", "--shift", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--shift 0 is outside" in res.stderr and NO_GPU not in res.stderr, res.stderr
    res = run_logits(exe, [999])  # and the prompt, before the weights would go to a GPU
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "999" in res.stderr, res.stderr
    assert NO_GPU not in res.stderr


def test_emit_is_the_c_model_with_a_cuda_forward_pass(tmp_path):
    from crystalc.backends.c import BACKEND as C

    for shape, tied in (("tied_unnormalised", True), ("three_blocks_n0_n1", False)):
        g = random_graph(shape, seed=7)
        cu, c = tmp_path / shape / "cu", tmp_path / shape / "c"
        for out, backend in ((cu, BACKEND), (c, C)):
            out.mkdir(parents=True)
            backend.emit(g, out)
        names = sorted(p.name for p in cu.iterdir())
        assert names == ["Makefile", "crystal.h", "crystal_cli.c", "crystal_forward.cu", "main.c", "model.c",
                         "model.h", "weights.S", "weights.bin"]
        for same in ("crystal.h", "crystal_cli.c", "model.h"):
            assert (cu / same).read_bytes() == (c / same).read_bytes(), same
        blob = (cu / "weights.bin").read_bytes()
        if tied:  # byte for byte the C backend's
            for same in ("model.c", "weights.S", "weights.bin"):
                assert (cu / same).read_bytes() == (c / same).read_bytes(), same
        else:  # an untied float32 head: plain [V, D] for the GPU, the C backend's CPU tiles nowhere
            assert g.head.weight is not None and g.head.weight.dtype == "f32"
            assert np.ascontiguousarray(g.head.weight.data, dtype="<f4").tobytes() in blob
            assert "head_tiles" not in (cu / "model.c").read_text()
            assert ".head_tiles = F(" in (c / "model.c").read_text()
        assert "head_tiles" not in (cu / "crystal_forward.cu").read_text()
    kernels = (cu / "crystal_forward.cu").read_text()
    for op in ("token_embedding", "layer_norm", "linear", "causal_attention", "neuron_field", "gelu"):
        assert f"__global__ void {op}(" in kernels
    for op in ("ffn", "head"):  # several kernels each, launched by a host function of the op's name
        assert f"static void {op}(" in kernels


def test_emit_and_build_take_no_options(tmp_path):
    # a mistyped or foreign option is an error, not silently ignored (no make or nvcc is run for it)
    g = random_graph("all_on", seed=1)
    with pytest.raises(TypeError, match="lanes"):
        BACKEND.emit(g, tmp_path, lanes=3)
    with pytest.raises(TypeError, match="nvccflags"):
        BACKEND.build(tmp_path, nvccflags="-O3")
    with pytest.raises(TypeError, match="cflags"):
        BACKEND.build(tmp_path, cflags="-O2")
    assert not any(tmp_path.iterdir())


@pytest.mark.tool
def test_compile_target_cuda_build(tmp_path):
    import sys

    from tests.conftest import save_pt

    ckpt = save_pt(random_graph("d40_h5", seed=8), tmp_path / "m.pt")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "crystalc.cli", "compile", str(ckpt), "--target", "cuda", "-o",
                          str(out), "--build"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == out / "model" and (out / "model").is_file()


# --- the kernels on a CPU (tests/backends/cuda_on_cpu.h) ----------------------------------------

CPU_EMULATION = Path(__file__).with_name("cuda_on_cpu.h")


def cpu_program(graph: Graph, out: Path, threads: int = 256, sanitize: bool = False) -> Path:
    """The CUDA program with its kernels compiled by g++ for cuda_on_cpu.h instead of nvcc.

    `threads` a block: the GPU build's 256, or as few as 32, which walks the kernels' strided
    loops more than once where a dimension passes 32. `sanitize`: under AddressSanitizer and
    UBSan, which see a kernel's read or write past its buffers (a GPU's allocations are
    rounded up, so it would often pass there unseen)."""
    require_tool("g++")
    out.mkdir(parents=True)
    BACKEND.emit(graph, out)
    # (-fsanitize-sections: redzones around the __shared__ arrays too, which cuda_on_cpu.h puts in a section)
    san = ["-fsanitize=address,undefined", "-fsanitize-sections=cuda_on_cpu_shared", "-fno-sanitize-recover=all",
           "-g"] if sanitize else []
    steps = [["g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", f"-DTHREADS={threads}", *san,
              "-include", str(CPU_EMULATION), "-x", "c++", "-c", "crystal_forward.cu", "-o", "crystal_forward.o"]]
    steps += [["cc", *STRICT_C.split(), "-ffp-contract=off", *san, "-c", f"{n}.c", "-o", f"{n}.o"]
              for n in ("main", "model", "crystal_cli")]
    steps += [["cc", "-c", "weights.S", "-o", "weights.o"],
              ["g++", *san, "-o", "model_cpu", "main.o", "model.o", "crystal_cli.o", "weights.o",
               "crystal_forward.o", "-lm"]]
    for cmd in steps:
        res = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr
    return out / "model_cpu"


@pytest.mark.tool
@pytest.mark.parametrize("threads", [256, 32])
@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_kernels_on_cpu_match_the_interpreter(shape, threads, tmp_path):
    # in three thread orders: a barrier missing between a writer and its reader shows in one of them
    g = random_graph(shape, seed=2)
    exe = cpu_program(g, tmp_path / "out", threads)
    ids = np.random.default_rng(4).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    for n in (1, len(ids)):
        for order in ("forward", "reverse", "shuffle"):
            _, got = parsed(run_logits(exe, ids[:n], order))
            assert np.abs(got - forward(g, ids[:n])[-1]).max() <= TOL


@pytest.mark.tool
def test_kernels_on_cpu_past_a_warp_under_sanitizers(tmp_path):
    # a window, neurons and a head width past 32, at 32 threads a block: every strided loop (positions,
    # head components, neurons, D) runs more than once; AddressSanitizer and UBSan watch every access
    g = random_graph(dict(vocab_size=50, d_model=72, n_ctx=40, n_heads=2, n_blocks=2, n_neurons=[40, 1],
                          ffn_hidden=90), seed=3)
    exe = cpu_program(g, tmp_path / "out", threads=32, sanitize=True)
    ids = np.random.default_rng(6).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    for order in ("forward", "shuffle"):
        res = run_logits(exe, ids, order)
        said = [ln for ln in res.stderr.splitlines() if "doesn't fully support makecontext" not in ln]
        assert res.returncode == 0 and not said, res.stderr[-2000:]  # (ASan's caveat about fibers aside)
        _, got = parsed(res)
        assert np.abs(got - forward(g, ids)[-1]).max() <= TOL * max(1.0, float(np.abs(forward(g, ids)).max()))


@pytest.mark.tool
def test_kernels_on_cpu_quantized_pruned_and_generating(tmp_path):
    from crystalc.ir.interpret import generate

    keep = [0, 2, 3, 7, 11, 19, 30]
    g = quantize(prune_vocab(random_graph("tied_unnormalised", seed=3), None, keep), "int8", "group:5")
    exe = cpu_program(g, tmp_path / "q")
    ids, got = parsed(run_logits(exe, [0, 2, 7, 30]))
    assert ids == keep
    assert np.abs(got - forward(g, g.to_current_ids([0, 2, 7, 30]))[-1]).max() <= TOL
    g = random_graph("three_blocks_n0_n1", seed=8)  # n_ctx 7: 12 tokens shift the window
    want = generate(g, [1, 2, 3], 12, 2)
    # a reference that can tell: five tokens, and another continuation under another shift (a repeated
    # token would pass with attention to the last token only, or with the shift ignored)
    assert len(set(want)) >= 4 and want != generate(g, [1, 2, 3], 12, 1)
    exe = cpu_program(g, tmp_path / "gen")
    res = subprocess.run([str(exe), "--prompt-ids", "1,2,3", "-n", "12", "-t", "0", "--shift", "2"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert [int(t) for t in res.stdout.strip().split(",")] == want
