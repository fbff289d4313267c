/* cuda_on_cpu.h: enough of CUDA's execution model to run crystal_forward.cu's kernels on a CPU, stopping
 * with one line where a GPU would hang, or worse, run on with wrong values.
 *
 *   g++ -std=c++20 -include cuda_on_cpu.h -x c++ -c crystal_forward.cu
 *
 * A test harness, not a backend. A block's threads are fibers (ucontext) on one OS thread. Each runs
 * until it returns or stops at a barrier: __syncthreads, the block's, or a warp shuffle, its mask's
 * lanes'. When none can run, the barriers they wait at are released, and a barrier that cannot be is
 * an error:
 *   - a shuffle goes when every lane of its mask (lanes: threadIdx.x % 32, warps: 32 consecutive
 *     threads) waits at the same call site with the same mask; each lane gets the value its source lane
 *     passed to that shuffle. A lane of the mask that returned, waits elsewhere or passed another mask,
 *     a mask without the caller's own lane, and a read of a lane outside the mask are errors. Other
 *     warps may be anywhere: a warp at a shuffle while the rest wait at __syncthreads is correct.
 *   - __syncthreads goes when every thread of the block waits at it, at one call site (function and
 *     line, from __builtin_FUNCTION and __builtin_LINE). A thread that returned or waits at another
 *     __syncthreads is an error: on a GPU the block hangs, or the barrier happens to pass.
 * An error prints one line, naming the kernel, the block and the threads with where they are, and
 * aborts: the program dies on SIGABRT, so the test fails.
 *
 * Order, and races: between two barriers a thread runs alone, from one to the next. A launch's blocks
 * run RESIDENT_THREADS threads' worth at a time, interleaved barrier by barrier, each with its own copy
 * of the __shared__ arrays. CUDA_ON_CPU_ORDER sets the order in which the blocks, and a block's threads,
 * take their turns: forward (0 first, the default), reverse, or shuffle[:SEED] (a new seeded permutation
 * at every turn). A race, two threads writing one place or one reading what another writes with no
 * barrier between, gives results that depend on that order: the tests run several orders and require
 * the same logits, bit for bit.
 *
 * Memory: shared memory is poisoned before every block: on a GPU it holds nothing defined when a block
 * starts, so a slot read before the block wrote it (a missing barrier) must not find a zero or the
 * previous block's value, which a softmax or a max can hide; see POISON. cudaMalloc's memory is
 * poisoned the same way, and remembered: cudaMemcpy checks its kind against the side each pointer is
 * on, cudaMemset and cudaFree that theirs is the GPU's, and a launch aborts on a pointer argument outside
 * cudaMalloc's memory (a host pointer, which a GPU cannot read). A launch CUDA refuses (no blocks, over
 * 1024 threads) runs nothing and leaves cudaErrorInvalidConfiguration for cudaGetLastError, as on a
 * GPU. Over 48 KB of static __shared__ memory, which nvcc refuses to build, aborts; the emulation sees
 * only every kernel's arrays together (and AddressSanitizer's redzones), a bound on any one's.
 *
 * What it cannot check: the GPU's own arithmetic (its expf, erff and sqrtf, fused multiply-adds); its
 * memory model: every write is seen at once by every thread, a thread's run between barriers never
 * interleaves with another's (two threads' x[i] += v lose no update here), and a race that gives the
 * same result in every order, or one between blocks that are never resident together, goes unseen; a
 * helper's __syncthreads reached through two different calls (one call site); pointers inside
 * structures passed to a kernel; occupancy, timing and performance. That needs a GPU.
 */
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __global__
#define __device__
#define __launch_bounds__(threads)
/* Every __shared__ array is one static copy, holding the bytes of the block that runs; launch swaps the
 * other resident blocks' bytes in and out. Every copy goes in one section, which the linker brackets with
 * __start_ and __stop_ symbols (GNU ld, lld and gold do for a section named like a C identifier), so the
 * launch can poison and swap them all without a list of the kernels' arrays. AddressSanitizer leaves
 * variables in a named section without redzones unless told otherwise: the tests pass
 * -fsanitize-sections=cuda_on_cpu_shared, keeping overruns of a shared array seen. */
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))
extern "C" unsigned char __start_cuda_on_cpu_shared[] __attribute__((weak));  /* weak: null in a */
extern "C" unsigned char __stop_cuda_on_cpu_shared[] __attribute__((weak));   /* program without any */

static dim3 threadIdx, blockIdx, blockDim, gridDim;  /* set for each fiber as it resumes */

typedef int cudaError_t;
enum { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInvalidConfiguration = 9 };

namespace cuda_on_cpu {
constexpr size_t STACK = 64 * 1024;
constexpr int WARP = 32;
/* The threads of a launch alive at once, in whole blocks: blocks interleave so that a race between them
 * shows, but every thread has a 64 KB stack, and (under AddressSanitizer) a cold one costs time */
constexpr int RESIDENT_THREADS = 4096;
constexpr size_t SHARED_LIMIT = 48 * 1024;  /* static __shared__ bytes a kernel may have */

enum class Stop { running, sync, shuffle, returned };

struct Fiber {
    ucontext_t context;
    std::unique_ptr<char[]> stack{new char[STACK]};
    Stop stop = Stop::running;
    const char *what = "", *func = "";  /* the barrier it waits at, and the function calling it */
    int line = 0;
    unsigned mask = 0;                  /* a shuffle's lanes */
    int src = 0;                        /* the lane whose value it reads */
    uint64_t offered = 0, got = 0;      /* the bits it passes, and those it gets back */
};

struct Block {
    int index;
    Fiber *threads;
    std::vector<unsigned char> shared;  /* its __shared__ bytes while another block runs */
    bool done = false;
};

inline ucontext_t scheduler;
inline Fiber *running;
inline std::function<void()> kernel;
inline const char *kernel_name = "";
inline std::vector<Fiber> fibers;
inline Block *resident;  /* the block whose bytes the __shared__ arrays hold */
inline cudaError_t last_error = cudaSuccess;
inline std::map<uintptr_t, size_t> device;  /* cudaMalloc's allocations: address -> bytes */

[[noreturn, gnu::format(printf, 1, 2)]] inline void fail(const char *fmt, ...) {
    std::fprintf(stderr, "cuda_on_cpu: ");
    va_list ap;
    va_start(ap, fmt);
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, "\n");
    std::abort();
}

/* where a fiber stopped, for an error's line */
inline std::string where(const Fiber &f) {
    char s[200];
    if (f.stop == Stop::returned) return "has returned";
    if (f.stop == Stop::sync) std::snprintf(s, sizeof s, "waits at %s in %s, line %d", f.what, f.func, f.line);
    else std::snprintf(s, sizeof s, "waits at %s (mask %#x) in %s, line %d", f.what, f.mask, f.func, f.line);
    return s;
}

/* thread t of block b at fault, or t and u at odds */
[[noreturn]] inline void fail_block(const Block &b, int t, int u, const char *problem) {
    if (u < 0) fail("%s<<<%u, %u>>> block %d: thread %d %s: %s", kernel_name, gridDim.x, blockDim.x, b.index, t,
                    where(b.threads[t]).c_str(), problem);
    fail("%s<<<%u, %u>>> block %d: thread %d %s, but thread %d %s %s", kernel_name, gridDim.x, blockDim.x, b.index, t,
         where(b.threads[t]).c_str(), u, where(b.threads[u]).c_str(), problem);
}

inline void stop_at(Stop s, const char *what, const char *func, int line) {
    Fiber &f = *running;
    f.stop = s;
    f.what = what;
    f.func = func;
    f.line = line;
    swapcontext(&f.context, &scheduler);
}

inline void fiber_main() {
    kernel();
    running->stop = Stop::returned;
    swapcontext(&running->context, &scheduler);  /* never resumed */
}

/* getcontext is declared as returning twice, so it lives apart from launch's loops (whose counters the
 * compiler would otherwise suspect clobbered); it returns once here, makecontext giving a new entry */
[[gnu::noinline]] inline void restart(Fiber &f) {
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = STACK;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_main, 0);
    /* makecontext has put the stack in the registers it saved, and swapcontext reads no more. Without
     * a size AddressSanitizer's swapcontext leaves the fiber's stack as it is, instead of clearing its
     * shadow (8 KB) at every switch: twice the whole run, with a few thousand fibers' stacks */
    f.context.uc_stack.ss_size = 0;
    f.stop = Stop::running;
}

/* --- the order of turns: CUDA_ON_CPU_ORDER ---------------------------------------------------- */

enum class Order { forward, reverse, shuffle };
inline std::mt19937 shuffler;

inline Order order() {
    static const Order how = [] {
        const char *e = std::getenv("CUDA_ON_CPU_ORDER"), *seed = e && !std::strncmp(e, "shuffle:", 8) ? e + 8 : "";
        char *end = nullptr;
        if (!e || !std::strcmp(e, "forward")) return Order::forward;
        if (!std::strcmp(e, "reverse")) return Order::reverse;
        if (!std::strcmp(e, "shuffle")) shuffler.seed(12345);  /* the same permutations every run */
        else if (*seed && (shuffler.seed((unsigned)std::strtoul(seed, &end, 10)), !*end)) {}
        else fail("CUDA_ON_CPU_ORDER=%s: expected forward, reverse, shuffle or shuffle:SEED", e);
        return Order::shuffle;
    }();
    return how;
}

/* 0..n-1 in the order of this run: a new permutation at every call when shuffled */
inline void arrange(std::vector<int> &turn, int n) {
    turn.resize((size_t)n);
    std::iota(turn.begin(), turn.end(), 0);
    if (order() == Order::reverse) std::reverse(turn.begin(), turn.end());
    if (order() == Order::shuffle) std::shuffle(turn.begin(), turn.end(), shuffler);
}

/* --- shared memory ---------------------------------------------------------------------------- */

inline size_t shared_bytes() { return (size_t)(__stop_cuda_on_cpu_shared - __start_cuda_on_cpu_shared); }

/* Every __shared__ byte starts as 0x7F: as a float 3.4e38, so a read before the block's write shows in
 * the logits. Not a NaN (0xFF bytes): fmaxf drops a NaN, so a block_max reading slots before their
 * writes would return the max of the slots written in time, a shift of the scores that the softmax
 * cancels; a huge value wins every max and swamps every sum instead. The section is copied byte by
 * byte through volatile pointers, unseen by AddressSanitizer: a memcpy would be checked, and refused,
 * on the redzones it puts between the arrays (only the arrays are read). */
constexpr unsigned char POISON = 0x7F;

[[gnu::no_sanitize_address]] inline void copy_bytes(volatile unsigned char *to, const volatile unsigned char *from,
                                                    size_t n) {
    for (size_t i = 0; i < n; i++) to[i] = from[i];
}

/* the __shared__ arrays to b's bytes, keeping those of the block that had them */
inline void enter(Block &b) {
    if (resident == &b) return;
    if (resident && !resident->done) copy_bytes(resident->shared.data(), __start_cuda_on_cpu_shared, shared_bytes());
    copy_bytes(__start_cuda_on_cpu_shared, b.shared.data(), shared_bytes());
    resident = &b;
}

/* --- a block's turn: its threads to their next barrier, then the barriers released ------------ */

/* the same text, most often the same string literal */
inline bool same(const char *a, const char *b) { return a == b || !std::strcmp(a, b); }

inline bool same_site(const Fiber &f, const Fiber &g) { return f.line == g.line && same(f.func, g.func); }

inline void release(Block &b) {
    int n = (int)blockDim.x, returned = -1, sync = -1, shuffles = 0, finished = 0;
    for (int t = 0; t < n; t++) {
        Stop s = b.threads[t].stop;
        if (s == Stop::returned && finished++ == 0) returned = t;
        if (s == Stop::sync && sync < 0) sync = t;
        shuffles += s == Stop::shuffle;
    }
    if (finished == n) {
        b.done = true;
        return;
    }
    /* Shuffles first: a warp at a shuffle while others wait at __syncthreads is correct (it reaches
     * the __syncthreads after), and, no thread being able to run, every shuffle must go now. */
    if (shuffles) {
        for (int t = 0; t < n; t++) {
            Fiber &f = b.threads[t];
            if (f.stop != Stop::shuffle) continue;
            int lane = t % WARP, warp = t - lane;
            if (!(f.mask >> lane & 1)) fail_block(b, t, -1, "its mask leaves out its own lane");
            for (int l = 0; l < WARP; l++) {
                if (!(f.mask >> l & 1)) continue;
                int u = warp + l;
                if (u >= n) fail_block(b, t, -1, "its mask names a lane past the block's last thread");
                const Fiber &g = b.threads[u];
                if (g.stop != Stop::shuffle || !same_site(f, g) || !same(g.what, f.what) || g.mask != f.mask)
                    fail_block(b, t, u, "(a shuffle must be reached by every lane of its mask, with that mask)");
            }
            if (!(f.mask >> f.src & 1)) fail_block(b, t, -1, "it reads a lane outside its mask");
            f.got = b.threads[warp + f.src].offered;
        }
        for (int t = 0; t < n; t++)
            if (b.threads[t].stop == Stop::shuffle) b.threads[t].stop = Stop::running;
        return;
    }
    if (returned >= 0) fail_block(b, sync, returned, "(every thread of a block must reach each __syncthreads)");
    for (int t = 0; t < n; t++) {
        if (!same_site(b.threads[t], b.threads[sync]))
            fail_block(b, sync, t, "(every thread of a block must reach the same __syncthreads)");
    }
    for (int t = 0; t < n; t++) b.threads[t].stop = Stop::running;
}

inline void turn(Block &b) {
    static std::vector<int> order_of_threads;
    arrange(order_of_threads, (int)blockDim.x);
    blockIdx.x = (unsigned)b.index;
    for (int t : order_of_threads) {
        Fiber &f = b.threads[t];
        if (f.stop != Stop::running) continue;
        threadIdx.x = (unsigned)t;
        running = &f;
        swapcontext(&scheduler, &f.context);
    }
    release(b);
}

/* --- launch ----------------------------------------------------------------------------------- */

inline bool on_device(const void *p, size_t n = 1) {  /* [p, p + n) inside one of cudaMalloc's allocations */
    uintptr_t a = (uintptr_t)p;
    auto it = device.upper_bound(a);
    if (it == device.begin()) return false;
    --it;
    return a - it->first < it->second && n <= it->second - (a - it->first);
}

template <class T>
void check_argument(int, const T &) {}

template <class T>
void check_argument(int i, T *p) {
    if (p && !on_device(p))
        fail("%s<<<%u, %u>>>: argument %d (%p) is not in cudaMalloc's memory: a host pointer, which a GPU cannot read",
             kernel_name, gridDim.x, blockDim.x, i, (const void *)p);
}

template <class K, class... A>
void launch(const char *name, int grid, int block, K k, A... args) {
    if (grid < 1 || block < 1 || block > 1024) {  /* what CUDA refuses as an invalid configuration */
        last_error = cudaErrorInvalidConfiguration;
        return;
    }
    kernel_name = name;
    gridDim.x = (unsigned)grid;
    blockDim.x = (unsigned)block;
    if (shared_bytes() > SHARED_LIMIT)  /* every kernel's arrays together: an upper bound of one's */
        fail("%s: %zu bytes of static __shared__ memory, over the 48 KB nvcc allows a kernel", name, shared_bytes());
    int i = 0;
    (check_argument(i++, args), ...);
    kernel = [=] { k(args...); };
    int wave = std::min(grid, std::max(1, RESIDENT_THREADS / block));  /* blocks resident together */
    if (fibers.size() < (size_t)wave * block) fibers.resize((size_t)wave * block);
    std::vector<int> order_of_blocks;
    arrange(order_of_blocks, grid);
    for (int first = 0; first < grid; first += wave) {
        std::vector<Block> blocks;
        for (int j = first; j < std::min(grid, first + wave); j++) {
            Fiber *threads = &fibers[(size_t)(j - first) * block];
            blocks.push_back(Block{order_of_blocks[(size_t)j], threads, std::vector<unsigned char>(shared_bytes(), POISON)});
            for (int t = 0; t < block; t++) restart(threads[t]);
        }
        resident = nullptr;
        for (bool left = true; left;) {
            left = false;
            for (Block &b : blocks) {
                if (b.done) continue;
                enter(b);
                turn(b);
                left = left || !b.done;
            }
        }
        resident = nullptr;
    }
}
}  // namespace cuda_on_cpu

#define LAUNCH(kernel_, grid, block, ...) cuda_on_cpu::launch(#kernel_, (grid), (block), kernel_, __VA_ARGS__)

/* --- barriers and shuffles, each knowing its call site ------------------------------------------- */

inline void __syncthreads(const char *func = __builtin_FUNCTION(), int line = __builtin_LINE()) {
    cuda_on_cpu::stop_at(cuda_on_cpu::Stop::sync, "__syncthreads", func, line);
}

namespace cuda_on_cpu {
/* v given, and the value of lane src (of this warp) returned, once every lane of mask is here */
template <class T>
T exchange(const char *what, unsigned mask, T v, int src, int width, const char *func, int line) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "a shuffle moves at most 8 bytes");
    if (width < 1 || width > WARP || (width & (width - 1)))
        fail("%s in %s, line %d: width %d is not a power of two from 1 to 32", what, func, line, width);
    Fiber &f = *running;
    f.mask = mask;
    f.src = src;
    std::memcpy(&f.offered, &v, sizeof v);
    stop_at(Stop::shuffle, what, func, line);
    std::memcpy(&v, &f.got, sizeof v);
    return v;
}
}  // namespace cuda_on_cpu

/* lane + delta's value, or its own where that leaves its width-lane segment */
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char *func = __builtin_FUNCTION(),
                   int line = __builtin_LINE()) {
    unsigned lane = threadIdx.x % 32, seg = lane % (unsigned)width;
    return cuda_on_cpu::exchange("__shfl_down_sync", mask, v, (int)(seg + delta < (unsigned)width ? lane + delta : lane),
                                 width, func, line);
}

/* lane ^ lane_mask's value, or its own where that leaves its segment */
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char *func = __builtin_FUNCTION(),
                  int line = __builtin_LINE()) {
    int lane = (int)(threadIdx.x % 32), src = lane ^ lane_mask;
    return cuda_on_cpu::exchange("__shfl_xor_sync", mask, v, src / width == lane / width ? src : lane, width, func, line);
}

/* the value of lane src_lane of its segment */
template <class T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char *func = __builtin_FUNCTION(),
              int line = __builtin_LINE()) {
    int lane = (int)(threadIdx.x % 32);
    return cuda_on_cpu::exchange("__shfl_sync", mask, v, lane / width * width + (src_lane & (width - 1)), width, func, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char *func = __builtin_FUNCTION(), int line = __builtin_LINE()) {
    cuda_on_cpu::exchange("__syncwarp", mask, 0, (int)(threadIdx.x % 32), 32, func, line);
}

/* --- the runtime: host memory stands for the GPU's, each allocation remembered ------------------ */

enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};

inline const char *cudaGetErrorString(cudaError_t err) {
    switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unrecognized error code";
    }
}

inline cudaError_t cudaPeekAtLastError() { return cuda_on_cpu::last_error; }

inline cudaError_t cudaGetLastError() {
    cudaError_t err = cuda_on_cpu::last_error;
    cuda_on_cpu::last_error = cudaSuccess;
    return err;
}

/* kernels run to completion at their launch here: nothing is left to wait for, and a kernel's fault has
 * already ended the program */
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }

inline cudaError_t cudaGetDeviceCount(int *n) {
    *n = 1;
    return cudaSuccess;
}

/* poisoned as shared memory is: cudaMalloc leaves the GPU's memory undefined too. CUDA_ON_CPU_MEMORY=BYTES
 * is the GPU's size: an allocation past it fails as on a GPU that is full. */
inline cudaError_t cudaMalloc(void **p, size_t n) {
    if (!n) n = 1;  /* a distinct address, so that it can be told from its neighbours */
    static const char *limit = std::getenv("CUDA_ON_CPU_MEMORY");
    size_t used = 0;
    for (const auto &a : cuda_on_cpu::device) used += a.second;
    if (limit && used + n > std::strtoull(limit, nullptr, 10)) return cudaErrorMemoryAllocation;
    void *m = std::malloc(n);
    if (!m) return cudaErrorMemoryAllocation;
    std::memset(m, cuda_on_cpu::POISON, n);
    cuda_on_cpu::device[(uintptr_t)m] = n;
    *p = m;
    return cudaSuccess;
}

inline cudaError_t cudaFree(void *p) {
    if (!p) return cudaSuccess;
    if (!cuda_on_cpu::device.erase((uintptr_t)p)) cuda_on_cpu::fail("cudaFree(%p): not an address cudaMalloc returned", p);
    std::free(p);
    return cudaSuccess;
}

inline cudaError_t cudaMemset(void *p, int v, size_t n) {
    if (!cuda_on_cpu::on_device(p, n)) cuda_on_cpu::fail("cudaMemset(%p, %d, %zu): not inside an allocation of cudaMalloc", p, v, n);
    std::memset(p, v, n);
    return cudaSuccess;
}

inline cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, cudaMemcpyKind kind) {
    static const char *const kinds[] = {"cudaMemcpyHostToHost", "cudaMemcpyHostToDevice", "cudaMemcpyDeviceToHost",
                                        "cudaMemcpyDeviceToDevice", "cudaMemcpyDefault"};
    if (kind < cudaMemcpyHostToHost || kind > cudaMemcpyDefault) return cudaErrorInvalidValue;
    bool to_device = kind == cudaMemcpyHostToDevice || kind == cudaMemcpyDeviceToDevice;
    bool from_device = kind == cudaMemcpyDeviceToHost || kind == cudaMemcpyDeviceToDevice;
    /* each side all in one allocation of cudaMalloc, or not in any */
    for (int side = 0; side < 2 && kind != cudaMemcpyDefault; side++) {
        const void *p = side ? src : dst;
        bool want = side ? from_device : to_device;
        if (want ? !cuda_on_cpu::on_device(p, n) : cuda_on_cpu::on_device(p))
            cuda_on_cpu::fail("cudaMemcpy(%p, %p, %zu, %s): the %s %s", dst, src, n, kinds[kind], side ? "source" : "destination",
                              want ? "is not (all) inside an allocation of cudaMalloc" : "is the GPU's memory");
    }
    std::memcpy(dst, src, n);
    return cudaSuccess;
}
