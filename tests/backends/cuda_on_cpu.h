/* cuda_on_cpu.h: enough of CUDA's execution model to run crystal_forward.cu's kernels on a CPU.
 *
 *   g++ -std=c++20 -include cuda_on_cpu.h -x c++ -c crystal_forward.cu
 *
 * A test harness, not a backend. Each launch runs its blocks one after another; a block's
 * threads are fibers (ucontext) on one OS thread, run in rounds: each runs until it
 * finishes or reaches a barrier, and a round ends when every unfinished one has. So
 * __syncthreads is a real barrier of the block, and __shfl_down_sync an exchange between
 * two barriers, and the kernels' indexing, reductions and synchronisation execute as
 * written, deterministically. What it cannot check is the GPU itself (its expf, erff
 * and sqrtf, memory model, occupancy): that needs a GPU.
 *
 * The order in which a round runs the threads is CUDA_ON_CPU_ORDER: forward (0 first, the
 * default), reverse, or shuffle (a new seeded permutation every round). A missing barrier
 * shows only in some orders (a reader running before its writer), so the tests run several.
 *
 * Shared memory is poisoned before every block: on a GPU it holds nothing defined when a block
 * starts, so a slot read before the block wrote it (a missing barrier) must not find a zero or
 * the previous block's value, which a softmax or a max can hide; see poison_shared.
 */
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <functional>
#include <memory>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
/* A block at a time: one static copy serves the block that runs. Every copy goes in one section,
 * which the linker brackets with __start_ and __stop_ symbols (GNU ld, lld and gold do for a section
 * named like a C identifier), so launch can poison them all without a list of the kernels' arrays.
 * AddressSanitizer leaves variables in a named section without redzones unless told otherwise:
 * the tests pass -fsanitize-sections=cuda_on_cpu_shared, keeping overruns of a shared array seen. */
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))
extern "C" unsigned char __start_cuda_on_cpu_shared[] __attribute__((weak));  /* weak: null in a */
extern "C" unsigned char __stop_cuda_on_cpu_shared[] __attribute__((weak));   /* program without any */

static dim3 threadIdx, blockIdx, blockDim;  /* set for each fiber as it resumes */

namespace cuda_on_cpu {
constexpr size_t STACK = 64 * 1024;

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack{new char[STACK]};
    bool done = false;
};

inline ucontext_t scheduler;
inline Fiber *running;
inline std::function<void()> kernel;
inline std::vector<Fiber> fibers;
inline std::vector<float> offered;  /* what each thread offers __shfl_down_sync */

inline void yield() { swapcontext(&running->context, &scheduler); }

inline void fiber_main() {
    kernel();
    running->done = true;
    yield();  /* never resumed */
}

/* getcontext is declared as returning twice, so it lives apart from launch's loops (whose counters the
 * compiler would otherwise suspect clobbered); it returns once here, makecontext giving a new entry */
[[gnu::noinline]] inline void restart(Fiber &f) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = STACK;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    f.done = false;
}

enum class Order { forward, reverse, shuffle };

inline Order order() {
    const char *e = std::getenv("CUDA_ON_CPU_ORDER");
    if (!e || !std::strcmp(e, "forward")) return Order::forward;
    if (!std::strcmp(e, "reverse")) return Order::reverse;
    if (!std::strcmp(e, "shuffle")) return Order::shuffle;
    std::fprintf(stderr, "CUDA_ON_CPU_ORDER=%s: expected forward, reverse or shuffle\n", e);
    std::abort();
}

inline std::mt19937 shuffler(12345);  /* the same permutations every run */

/* Every __shared__ byte to 0x7F before a block: as a float 3.4e38, so a read before the block's
 * write shows in the logits. Not a NaN (0xFF bytes): fmaxf drops a NaN, so a block_max reading
 * slots before their writes would return the max of the slots written in time, a shift of the
 * scores that the softmax cancels; a huge value wins every max and swamps every sum instead.
 * Byte by byte through a volatile pointer, and unseen by AddressSanitizer: a memset would be
 * checked, and refused, on the redzones it puts between the arrays (only the arrays are read). */
[[gnu::no_sanitize_address]] inline void poison_shared() {
    for (volatile unsigned char *p = __start_cuda_on_cpu_shared; p < __stop_cuda_on_cpu_shared; p++) *p = 0x7F;
}

template <class Body>
void launch(int grid, int block, Body body) {
    if (grid < 1 || block < 1 || block > 1024) {  /* what CUDA refuses as an invalid configuration */
        std::fprintf(stderr, "cuda_on_cpu: a launch of %d blocks of %d threads\n", grid, block);
        std::abort();
    }
    kernel = body;
    if ((int)fibers.size() < block) fibers.resize((size_t)block);
    offered.assign((size_t)block, 0.0f);
    std::vector<int> turn((size_t)block);
    std::iota(turn.begin(), turn.end(), 0);
    Order how = order();
    if (how == Order::reverse) std::reverse(turn.begin(), turn.end());
    for (int b = 0; b < grid; b++) {
        poison_shared();
        for (int t = 0; t < block; t++) restart(fibers[(size_t)t]);
        for (bool unfinished = true; unfinished;) {  /* a round: every thread to its next barrier */
            unfinished = false;
            if (how == Order::shuffle) std::shuffle(turn.begin(), turn.end(), shuffler);
            for (int t : turn) {
                Fiber &f = fibers[(size_t)t];
                if (f.done) continue;
                threadIdx.x = (unsigned)t;
                blockIdx.x = (unsigned)b;
                blockDim.x = (unsigned)block;
                running = &f;
                swapcontext(&scheduler, &f.context);
                unfinished = unfinished || !f.done;
            }
        }
    }
}
}  // namespace cuda_on_cpu

#define LAUNCH(kernel_, grid, block, ...) cuda_on_cpu::launch((grid), (block), [=] { kernel_(__VA_ARGS__); })

inline void __syncthreads() { cuda_on_cpu::yield(); }

/* every lane of a warp calls it together (the kernels only call it with a full mask) */
inline float __shfl_down_sync(unsigned, float v, int offset) {
    unsigned tid = threadIdx.x, lane = tid % 32;
    cuda_on_cpu::offered[tid] = v;
    cuda_on_cpu::yield();  /* every lane has offered its value */
    float out = lane + (unsigned)offset < 32 ? cuda_on_cpu::offered[tid + (unsigned)offset] : v;
    cuda_on_cpu::yield();  /* every lane has read before any offers again */
    return out;
}

/* the runtime: host memory stands for the GPU's */
typedef int cudaError_t;
enum { cudaSuccess = 0 };
enum cudaMemcpyKind { cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost };
inline const char *cudaGetErrorString(cudaError_t) { return "no error"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}
inline cudaError_t cudaMalloc(void **p, size_t n) {
    *p = std::malloc(n);
    return *p ? cudaSuccess : 2;
}
inline cudaError_t cudaFree(void *p) {
    std::free(p);
    return cudaSuccess;
}
inline cudaError_t cudaMemset(void *p, int v, size_t n) {
    std::memset(p, v, n);
    return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind) {
    std::memcpy(dst, src, n);
    return cudaSuccess;
}
