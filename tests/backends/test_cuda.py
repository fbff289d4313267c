"""The CUDA backend: nvcc builds every program here; the programs run where a GPU is.

This machine (and CI) has nvcc but no GPU, so the builds are checked everywhere
(with every warning an error) and the GPU parity tests skip with the reason; on a
machine with a GPU they run. The kernels themselves also run here: g++ compiles
crystal_forward.cu against cuda_on_cpu.h, which executes every block as threads
(fibers) meeting at real barriers, so their indexing, reductions and
synchronisation are checked on every shape. The emulation stops the program with
one line where a GPU would hang or misbehave: a __syncthreads not every thread of
the block reaches (one returned, or waits at another call site), a shuffle not
reached by exactly the lanes of its mask (threadIdx.x % 32 of 32-thread warps)
with that mask, a host pointer given to a kernel, a cudaMemcpy of the wrong kind;
a launch of over 1024 threads is an error for cudaGetLastError. It runs a launch's
blocks, and a block's threads, in the order CUDA_ON_CPU_ORDER says, and the tests
require the same logits, bit for bit, in every order: a race shows as a
difference. The emulation's checks are shown to bite by EMULATION_CASES, small
kernels that break each rule. What it cannot check, the GPU's own expf, erff and
sqrtf, its memory model (a thread's run between barriers is never interleaved
with another's here; blocks interleave only a few thousand threads at a time) and
performance, needs a GPU.

Tolerance, both ways: max abs logit error <= 1e-4, as for C: float32 throughout,
reductions in a different order than numpy (warp shuffles, block trees), expf,
erff and sqrtf within 2 ulp (the kernels' own multiply-adds unfused, --fmad=false), and
integer weights are dequantized on the host exactly as the IR.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from crystalc.backends.cuda import BACKEND
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool

# under pytest-xdist the file's tests share one worker, which builds its module fixtures
# (the GPU probe's build and the emulation's) once
pytestmark = pytest.mark.xdist_group("test_cuda")

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
                         "model.h", "unicode_classes.h", "weights.S", "weights.bin"]
        for same in ("crystal.h", "unicode_classes.h", "crystal_cli.c", "model.h"):
            assert (cu / same).read_bytes() == (c / same).read_bytes(), same
        blob = (cu / "weights.bin").read_bytes()
        if tied:  # byte for byte the C backend's, but model.c's note of which file holds the forward pass
            for same in ("weights.S", "weights.bin"):
                assert (cu / same).read_bytes() == (c / same).read_bytes(), same
            cu_model = (cu / "model.c").read_text()
            assert "The forward pass is crystal_forward.cu." in cu_model
            assert cu_model.replace("crystal_forward.cu.", "crystal_forward.c.") == (c / "model.c").read_text()
        else:  # an untied float32 head: plain [V, D] for the GPU, the C backend's CPU tiles nowhere
            assert g.head.weight is not None and g.head.weight.dtype == "f32"
            assert np.ascontiguousarray(g.head.weight.data, dtype="<f4").tobytes() in blob
            assert "head_tiles" not in (cu / "model.c").read_text()
            assert ".head_tiles = F(" in (c / "model.c").read_text()
        assert "head_tiles" not in (cu / "crystal_forward.cu").read_text()
    kernels = (cu / "crystal_forward.cu").read_text()
    for op in ("token_embedding", "layer_norm", "linear", "causal_attention", "neuron_field", "gelu"):
        assert f"__global__ void __launch_bounds__(THREADS)\n{op}(" in kernels
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
def test_the_makefile_keeps_ieee_math_whatever_nvccflags_say(tmp_path):
    # nvcc takes an option's last value, so the Makefile's IEEE flags after NVCCFLAGS win; no later flag
    # undoes -use_fast_math's approximate expf, so that is refused
    require_tool("make")
    BACKEND.emit(random_graph("d40_h5", seed=2), tmp_path)
    res = subprocess.run(["make", "-n", "NVCCFLAGS=-O3 --ftz=true --prec-div=false --fmad=true"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if "crystal_forward.cu" in x).split()
    for user, ours in (("--ftz=true", "--ftz=false"), ("--prec-div=false", "--prec-div=true"),
                       ("--fmad=true", "--fmad=false")):
        assert line.index(user) < line.index(ours), line
    assert "--prec-sqrt=true" in line
    # wherever given: host flags nvcc passes on (-Xcompiler, comma-separated or after =) and CC too
    for flags, says in (("NVCCFLAGS=-O3 -use_fast_math", "has -use_fast_math"),
                        ("CFLAGS=-O2 -ffast-math", "has -ffast-math"), ("CC=cc -Ofast", "has -Ofast"),
                        ("NVCCFLAGS=-O3 -Xcompiler=-O3,-ffast-math", "has -ffast-math"),
                        ("NVCCFLAGS=-Xcompiler -ffinite-math-only", "has -ffinite-math-only"),
                        ("NVCC=nvcc -use_fast_math", "has -use_fast_math")):
        res = subprocess.run(["make", "-n", flags], cwd=tmp_path, capture_output=True, text=True)
        assert res.returncode != 0 and says in res.stderr, res.stderr
    # nvcc reads flags from its environment too, and takes NVCC_APPEND_FLAGS after the Makefile's own
    for env, says in ((dict(NVCC_APPEND_FLAGS="-use_fast_math"), "has -use_fast_math"),
                      (dict(NVCC_PREPEND_FLAGS="-Xcompiler=-ffast-math"), "has -ffast-math"),
                      (dict(NVCC_APPEND_FLAGS="-O3 --fmad=true"), "NVCC_APPEND_FLAGS sets --fmad")):
        res = subprocess.run(["make", "-n"], cwd=tmp_path, capture_output=True, text=True, env={**os.environ, **env})
        assert res.returncode != 0 and says in res.stderr, (env, res.stderr)
    res = subprocess.run(["make", "-n"], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "NVCC_APPEND_FLAGS": "-lineinfo", "NVCC_PREPEND_FLAGS": "-O3"})
    assert res.returncode == 0, res.stderr


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
ORDERS = ("forward", "reverse", "shuffle")  # CUDA_ON_CPU_ORDER: the order of a launch's blocks and a block's threads


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
    steps = [["g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", f"-DTHREADS={threads}",
              *san,
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
def test_a_full_gpu_is_one_line_naming_the_program(tmp_path):
    # a cudaMalloc that fails partway through the uploads: one line under the program's own name, exit 2,
    # and (under the sanitizers) nothing leaked or freed twice on the way out
    exe = cpu_program(random_graph("d40_h5", seed=3), tmp_path / "out", sanitize=True)
    res = subprocess.run([str(exe), "--prompt-ids", "1,2", "--logits"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_ON_CPU_MEMORY": "20000"})
    assert res.returncode == 2 and len(res.stderr.splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"{exe}: error: CUDA ") and "out of memory" in res.stderr, res.stderr


@pytest.mark.tool
@pytest.mark.parametrize("threads", [256, 32])
@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_kernels_on_cpu_match_the_interpreter(shape, threads, tmp_path):
    # in three orders of blocks and threads: a barrier missing between a writer and its reader shows in one
    # of them, and any race as logits that differ, in any bit, from one order to another
    g = random_graph(shape, seed=2)
    exe = cpu_program(g, tmp_path / "out", threads)
    ids = np.random.default_rng(4).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    for n in (1, len(ids)):
        printed = {}
        for order in ORDERS:
            res = run_logits(exe, ids[:n], order)
            _, got = parsed(res)
            assert np.abs(got - forward(g, ids[:n])[-1]).max() <= TOL
            printed[order] = res.stdout  # %.9g: every bit of a float32
        assert len(set(printed.values())) == 1, f"the logits depend on the order: a race ({sorted(printed)})"


@pytest.mark.tool
def test_kernels_on_cpu_past_a_warp_under_sanitizers(tmp_path):
    # a window, neurons and a head width past 32, at 32 threads a block: every strided loop (positions,
    # head components, neurons, D) runs more than once; AddressSanitizer and UBSan watch every access
    g = random_graph(dict(vocab_size=50, d_model=72, n_ctx=40, n_heads=2, n_blocks=2, n_neurons=[40, 1],
                          ffn_hidden=90), seed=3)
    exe = cpu_program(g, tmp_path / "out", threads=32, sanitize=True)
    ids = np.random.default_rng(6).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    printed = set()
    for order in ("forward", "shuffle"):
        res = run_logits(exe, ids, order)
        said = [ln for ln in res.stderr.splitlines() if "doesn't fully support makecontext" not in ln]
        assert res.returncode == 0 and not said, res.stderr[-2000:]  # (ASan's caveat about fibers aside)
        _, got = parsed(res)
        assert np.abs(got - forward(g, ids)[-1]).max() <= TOL
        printed.add(res.stdout)
    assert len(printed) == 1, "the logits depend on the order: a race"


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


# --- the emulation's own checks, each shown to bite on a small kernel that breaks its rule -------

EMULATION_CASES = r"""
/* kernels breaking the rules cuda_on_cpu.h checks, one a case, and some keeping them: ./cases NAME */
#include <stdio.h>
#include <string.h>

__global__ void fill(float *out) { out[threadIdx.x] = 1.0f; }

/* a barrier in a branch some threads skip: on a GPU a hang, or a barrier that passes too soon */
__global__ void sync_skipped(float *out) {
    if (threadIdx.x < 8) __syncthreads();
    out[threadIdx.x] = 1.0f;
}

/* a barrier on each side of a branch: two barriers, not one */
__global__ void sync_sites(float *out) {
    if (threadIdx.x < 8) __syncthreads();
    else __syncthreads();
    out[threadIdx.x] = 1.0f;
}

/* half of each warp at a shuffle of all its lanes, the other half at a barrier */
__global__ void sync_and_shuffle(float *out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v = __shfl_down_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}

/* a full mask, half a warp calling */
__global__ void half_warp(float *out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) v += __shfl_down_sync(0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

/* one shuffle, called with two masks */
__global__ void masks_differ(float *out) {
    float v = (float)threadIdx.x;
    v += __shfl_xor_sync(threadIdx.x % 32 < 16 ? 0x0000ffffu : 0xffffffffu, v, 1);
    out[threadIdx.x] = v;
}

/* lanes 16-31 name lanes 0-15 only */
__global__ void own_lane_left_out(float *out) {
    float v = (float)threadIdx.x;
    v += __shfl_xor_sync(0x0000ffffu, v, 1);
    out[threadIdx.x] = v;
}

/* lanes 0-7 together, lane 4 reading lane 8 */
__global__ void read_outside_mask(float *out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 8) v += __shfl_down_sync(0x000000ffu, v, 4);
    out[threadIdx.x] = v;
}

/* keeping the rules, 64 threads: warp 0 sums its lanes by a butterfly while warp 1 sums each half apart
 * (a mask and a width of 16) and may wait at the barrier already; then warp 1 returns while warp 0
 * broadcasts lane 3 and shifts down by 16 */
__global__ void warps(float *out) {
    int t = (int)threadIdx.x, lane = t % 32;
    float v = (float)t;
    if (t < 32)
        for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
    else
        for (int m = 8; m > 0; m /= 2) v += __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffff0000u, v, m, 16);
    out[t] = v;
    __syncthreads();
    if (t >= 32) return;
    out[64 + t] = __shfl_sync(0xffffffffu, v + (float)lane, 3) + __shfl_down_sync(0xffffffffu, (float)lane, 16);
}

/* a neighbour's slot read with no barrier after the writes */
__global__ void race(float *s, float *out) {
    s[threadIdx.x] = (float)threadIdx.x;
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

__global__ void race_fixed(float *s, float *out) {
    s[threadIdx.x] = (float)threadIdx.x;
    __syncthreads();
    out[threadIdx.x] = s[(threadIdx.x + 1) % blockDim.x];
}

/* every thread adding to one float: on a GPU updates are lost; here (a thread's run is never interleaved)
 * only the order of the sums changes, and with it the last bits */
__global__ void sum_race(float *out) { out[0] += 1.0f / (float)(threadIdx.x + 1); }

/* every block's scratch in one place: blocks run at once on a GPU */
__global__ void blocks_race(float *scratch, float *out) {
    scratch[threadIdx.x] = (float)(100 * blockIdx.x + threadIdx.x);
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = scratch[threadIdx.x];
}

#ifdef BIG_SHARED
__global__ void big_shared(float *out) {  /* 49156 bytes: nvcc refuses a kernel over 48 KB */
    __shared__ float big[12289];
    big[threadIdx.x] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = big[0];
}
#endif

int main(int argc, char **argv) {
    const char *c = argc == 2 ? argv[1] : "";
    int n = 64;
    float *dev, *scratch, host[128] = {0};
    cudaMalloc((void **)&dev, sizeof host);
    cudaMalloc((void **)&scratch, sizeof host);
    cudaMemset(dev, 0, sizeof host);
    if (!strcmp(c, "sync_skipped")) LAUNCH(sync_skipped, 1, 64, dev);
    else if (!strcmp(c, "sync_sites")) LAUNCH(sync_sites, 1, 64, dev);
    else if (!strcmp(c, "sync_and_shuffle")) LAUNCH(sync_and_shuffle, 1, 64, dev);
    else if (!strcmp(c, "half_warp")) LAUNCH(half_warp, 1, 64, dev);
    else if (!strcmp(c, "masks_differ")) LAUNCH(masks_differ, 1, 64, dev);
    else if (!strcmp(c, "own_lane_left_out")) LAUNCH(own_lane_left_out, 1, 64, dev);
    else if (!strcmp(c, "read_outside_mask")) LAUNCH(read_outside_mask, 1, 64, dev);
    else if (!strcmp(c, "warps")) LAUNCH(warps, 1, (n = 96, 64), dev);
    else if (!strcmp(c, "race")) LAUNCH(race, 1, 64, scratch, dev);
    else if (!strcmp(c, "race_fixed")) LAUNCH(race_fixed, 1, 64, scratch, dev);
    else if (!strcmp(c, "blocks_race")) LAUNCH(blocks_race, 2, 32, scratch, dev);
    else if (!strcmp(c, "sum_race")) LAUNCH(sum_race, 1, (n = 1, 64), dev);
    else if (!strcmp(c, "memcpy_kind")) cudaMemcpy(dev, host, sizeof host, cudaMemcpyDeviceToHost);
    else if (!strcmp(c, "host_pointer")) LAUNCH(fill, 1, 64, host);
    else if (!strcmp(c, "free_host")) cudaFree(host);
    else if (!strcmp(c, "too_many_threads")) {
        LAUNCH(fill, 1, 2048, dev);
        printf("%s\n", cudaGetErrorString(cudaGetLastError()));
        printf("%s\n", cudaGetErrorString(cudaGetLastError()));  /* read, the error is gone */
        n = 1;
    }
#ifdef BIG_SHARED
    else if (!strcmp(c, "big_shared")) LAUNCH(big_shared, 1, 64, dev);
#endif
    else return 2;
    cudaMemcpy(host, dev, (size_t)n * sizeof *host, cudaMemcpyDeviceToHost);
    for (int i = 0; i < n; i++) printf("%.9g\n", host[i]);
    cudaFree(scratch);
    cudaFree(dev);
    return 0;
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory) -> Callable[..., subprocess.CompletedProcess]:
    """Runs a case of EMULATION_CASES: emulated(name, order), in a build with the big_shared kernel or not."""
    require_tool("g++")
    out = tmp_path_factory.mktemp("emulation")
    (out / "cases.cu").write_text(EMULATION_CASES)
    builds = {exe: subprocess.Popen(["g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", *flags, "-include",
                                     str(CPU_EMULATION), "-x", "c++", "cases.cu", "-o", exe], cwd=out,
                                    stderr=subprocess.PIPE, text=True)
              for exe, flags in (("cases", []), ("big", ["-DBIG_SHARED"]))}
    for build in builds.values():
        _, err = build.communicate(timeout=600)
        assert build.returncode == 0, err

    def run(case: str, order: str = "forward") -> subprocess.CompletedProcess:
        exe = out / ("big" if case == "big_shared" else "cases")
        return subprocess.run([str(exe), case], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "CUDA_ON_CPU_ORDER": order})

    return run


@pytest.mark.tool
@pytest.mark.parametrize("case,says", [
    ("sync_skipped", r"thread 0 waits at __syncthreads in sync_skipped, line \d+, but thread 8 has returned \(every "),
    ("sync_sites", r"thread 0 waits at __syncthreads in sync_sites, line (\d+), but thread 8 waits at __syncthreads "
                   r"in sync_sites, line (?!\1)\d+ \(every thread of a block must reach the same __syncthreads\)"),
    ("sync_and_shuffle", r"thread 0 waits at __shfl_down_sync \(mask 0xffffffff\) in sync_and_shuffle, line \d+, "
                         r"but thread 16 waits at __syncthreads in sync_and_shuffle, line \d+ \(a shuffle must be "),
    ("half_warp", r"thread 0 waits at __shfl_down_sync \(mask 0xffffffff\) in half_warp, line \d+, but thread 16 "
                  r"has returned \(a shuffle must be reached by every lane of its mask, with that mask\)"),
    ("masks_differ", r"thread 16 waits at __shfl_xor_sync \(mask 0xffffffff\) .*, but thread 0 waits at "
                     r"__shfl_xor_sync \(mask 0xffff\) "),
    ("own_lane_left_out", r"thread 16 waits at __shfl_xor_sync \(mask 0xffff\) .*: its mask leaves out its own lane"),
    ("read_outside_mask", r"thread 4 waits at __shfl_down_sync \(mask 0xff\) .*: it reads a lane outside its mask"),
    ("memcpy_kind", r"cudaMemcpy\(.*, cudaMemcpyDeviceToHost\): the destination is the GPU's memory"),
    ("host_pointer", r"fill<<<1, 64>>>: argument 0 \(0x[0-9a-f]+\) is not in cudaMalloc's memory"),
    ("free_host", r"cudaFree\(0x[0-9a-f]+\): not an address cudaMalloc returned"),
    ("big_shared", r"big_shared: \d+ bytes of static __shared__ memory, over the 48 KB"),
])
def test_emulation_refuses_what_a_gpu_would_not_run(case, says, emulated):
    for order in ("forward", "reverse"):
        res = emulated(case, order)
        assert res.returncode != 0 and res.stdout == "", (res.returncode, res.stdout)
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("cuda_on_cpu: "), res.stderr
        assert re.search(says, res.stderr), res.stderr
        kernel = case if case not in ("memcpy_kind", "host_pointer", "free_host", "big_shared") else None
        assert kernel is None or res.stderr.startswith(f"cuda_on_cpu: {kernel}<<<1, 64>>> block 0: thread ")


@pytest.mark.tool
def test_emulation_runs_warps_that_keep_the_rules(emulated):
    lanes = np.arange(32)
    shifted = np.where(lanes < 16, lanes + 16, lanes)  # down by 16, a lane past the warp keeping its own
    want = np.concatenate([np.full(32, lanes.sum()), np.full(16, (32 + lanes[:16]).sum()),
                           np.full(16, (48 + lanes[:16]).sum()), lanes.sum() + 3 + shifted])
    for order in (*ORDERS, "shuffle:7"):
        res = emulated("warps", order)
        assert res.returncode == 0, res.stderr
        assert np.array_equal(np.array(res.stdout.split(), dtype=float), want), res.stdout


@pytest.mark.tool
def test_emulation_orders_show_races(emulated):
    # a race between threads and one between blocks give other results in another order (the kernels' tests
    # require the same bits in every order); with the barrier, every order agrees
    for case in ("race", "blocks_race"):
        assert emulated(case, "forward").stdout != emulated(case, "reverse").stdout, case
    # one that changes only the rounding: within any tolerance, not the same bits
    sums = [float(emulated("sum_race", order).stdout) for order in ("forward", "reverse")]
    assert sums[0] != sums[1] and abs(sums[0] - sums[1]) < 1e-6 * sums[0], sums
    assert len({emulated("race_fixed", order).stdout for order in (*ORDERS, "shuffle:7")}) == 1
    res = emulated("race_fixed", "backwards")
    assert res.returncode != 0 and "CUDA_ON_CPU_ORDER=backwards: expected forward, reverse" in res.stderr


@pytest.mark.tool
def test_emulation_reports_a_refused_launch_through_cudagetlasterror(emulated):
    # as a GPU does: the kernel does not run, and the error is read once
    res = emulated("too_many_threads")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["invalid configuration argument", "no error", "0"]
