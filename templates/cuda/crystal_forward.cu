/* crystal_forward.cu: the forward pass of crystal.h on a CUDA GPU, one kernel per IR op.
 *
 * Copied by crystalc, unchanged, into every CUDA program; it replaces crystal_forward.c,
 * with the same functions, so the command line (crystal_cli.c) and the model (model.c)
 * are the C backend's. crystal_state_init copies the weights to the GPU once, as float32:
 * integer tensors are dequantized on the host exactly as the IR defines it,
 * (float)code * scale + offset in two roundings (the Makefile compiles host code with
 * -ffp-contract=off). Device code is compiled with --fmad=false, so the kernels' own
 * products and sums round separately; CUDA's expf and erff use fused multiply-adds inside,
 * within their documented 2 ulp. Neither matters to the tolerance (the sums' order moves a
 * logit more); only the dequantization must be exact.
 *
 * A position runs as a short sequence of kernels on the default stream: token_embedding,
 * then per block layer_norm, linear (q, k and v, the last two into the KV cache),
 * causal_attention, linear (out_proj, added to x), layer_norm, neuron_field (added to x),
 * layer_norm, ffn (linear fc1, gelu, linear fc2 added to x); then the optional final
 * layer_norm and head (a linear). ffn and head are host functions launching those kernels, so
 * every IR op has its name here as in crystal_forward.c. A window is its positions one after
 * another.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern "C" {
#include "crystal.h"
}

#ifndef THREADS
#define THREADS 256  /* threads a block: a power of two >= 32; the block-wide reductions assume it */
#endif
static_assert(THREADS >= 32 && THREADS <= 1024 && (THREADS & (THREADS - 1)) == 0,
              "THREADS must be a power of two from 32 to 1024: the block-wide reductions halve it to a warp");

/* kernel<<<grid, block>>>(args), spelled so that a test can run the kernels on a CPU
 * (tests/backends/cuda_on_cpu.h defines LAUNCH with threads and barriers) */
#ifndef LAUNCH
#define LAUNCH(kernel, grid, block, ...) kernel<<<(grid), (block)>>>(__VA_ARGS__)
#endif

/* A device failure ends the program, one line and exit status 2, rather than travelling back as an error:
 * this file is linked only into its own program (no library of it is loaded into another process), and
 * a GPU that failed a malloc, copy or launch mid-generation leaves nothing to recover. */
static const char *cuda_prog = "crystal";  /* argv[0], once crystal_cuda_check has it */

static void cuda_fail(cudaError_t err, const char *what) {
    fprintf(stderr, "%s: error: CUDA %s: %s\n", cuda_prog, what, cudaGetErrorString(err));
    exit(2);
}

#define CK(call, what)                                  \
    do {                                                \
        cudaError_t err_ = (call);                      \
        if (err_ != cudaSuccess) cuda_fail(err_, what); \
    } while (0)

/* --- kernels, named after the IR ops ------------------------------------------------------ */

/* The sum of v over the block's THREADS threads, returned to every thread. */
__device__ static float block_sum(float v, float *shared) {
    int tid = (int)threadIdx.x;
    shared[tid] = v;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) shared[tid] += shared[tid + stride];
        __syncthreads();
    }
    float total = shared[0];
    __syncthreads();
    return total;
}

__device__ static float block_max(float v, float *shared) {
    int tid = (int)threadIdx.x;
    shared[tid] = v;
    __syncthreads();
    for (int stride = THREADS / 2; stride > 0; stride /= 2) {
        if (tid < stride) shared[tid] = fmaxf(shared[tid], shared[tid + stride]);
        __syncthreads();
    }
    float m = shared[0];
    __syncthreads();
    return m;
}

/* token_embedding + position_embedding: x = token_embed[tok] + pos_embed[pos] */
__global__ void __launch_bounds__(THREADS)
token_embedding(const float *embed, const float *pos_embed, int tok, int pos, int d, float *x) {
    for (int i = (int)threadIdx.x; i < d; i += (int)blockDim.x)
        x[i] = embed[(size_t)tok * d + i] + pos_embed[(size_t)pos * d + i];
}

/* out = (x - mean) / sqrt(var + eps) * w + b, one block */
__global__ void __launch_bounds__(THREADS)
layer_norm(const float *x, const float *w, const float *b, int d, float eps, float *out) {
    __shared__ float shared[THREADS];
    float s = 0.0f;
    for (int i = threadIdx.x; i < d; i += THREADS) s += x[i];
    float mean = block_sum(s, shared) / (float)d;
    float q = 0.0f;
    for (int i = threadIdx.x; i < d; i += THREADS) q += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(block_sum(q, shared) / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += THREADS) out[i] = (x[i] - mean) * inv * w[i] + b[i];
}

/* y[r] (+)= W[r] . x + b[r]: one warp a row */
__global__ void __launch_bounds__(THREADS)
linear(const float *w, const float *b, const float *x, int rows, int cols, float *y, int accumulate) {
    int row = (int)((blockIdx.x * blockDim.x + threadIdx.x) / 32);
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float *wr = w + (size_t)row * cols;
    float s = 0.0f;
    for (int k = lane; k < cols; k += 32) s += wr[k] * x[k];
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) y[row] = (accumulate ? y[row] : 0.0f) + (s + b[row]);
}

/* y[head] = softmax(q k^T / sqrt(hd)) v over positions 0..pos, one block a head;
 * scores holds n_ctx floats a head */
__global__ void __launch_bounds__(THREADS)
causal_attention(const float *q, const float *kc, const float *vc, int pos, int d, int hd,
                 int n_ctx, float *scores, float *y) {
    __shared__ float shared[THREADS];
    int head = blockIdx.x;
    const float *qh = q + head * hd;
    float *sc = scores + (size_t)head * n_ctx;
    float scale = 1.0f / sqrtf((float)hd);
    float m = -INFINITY;
    for (int j = threadIdx.x; j <= pos; j += THREADS) {
        const float *kj = kc + (size_t)j * d + head * hd;
        float s = 0.0f;
        for (int i = 0; i < hd; i++) s += qh[i] * kj[i];
        sc[j] = s * scale;
        m = fmaxf(m, sc[j]);
    }
    m = block_max(m, shared);
    float part = 0.0f;
    for (int j = threadIdx.x; j <= pos; j += THREADS) {
        sc[j] = expf(sc[j] - m);
        part += sc[j];
    }
    float total = block_sum(part, shared);
    for (int i = threadIdx.x; i < hd; i += THREADS) {
        float acc = 0.0f;
        for (int j = 0; j <= pos; j++) acc += sc[j] * vc[(size_t)j * d + head * hd + i];
        y[head * hd + i] = acc / total;
    }
}

/* x += sum_j w_j val_j, w_j = exp(-|h - pos_j| / (|tau_j| + 0.1)) (normalised: / (sum + eps)),
 * one block; w holds n floats */
__global__ void __launch_bounds__(THREADS)
neuron_field(const float *h, const float *positions, const float *values, const float *temperature,
             int n, int d, int normalize, float eps, float *w, float *x) {
    __shared__ float shared[THREADS];
    float part = 0.0f;
    for (int j = threadIdx.x; j < n; j += THREADS) {
        const float *p = positions + (size_t)j * d;
        float s = 0.0f;
        for (int k = 0; k < d; k++) s += (h[k] - p[k]) * (h[k] - p[k]);
        w[j] = expf(-sqrtf(s) / (fabsf(temperature[j]) + 0.1f));
        part += w[j];
    }
    float total = block_sum(part, shared);  /* also the barrier after w is written */
    float den = normalize ? total + eps : 1.0f;
    for (int k = threadIdx.x; k < d; k += THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += (normalize ? w[j] / den : w[j]) * values[(size_t)j * d + k];
        x[k] += acc;
    }
}

/* u = GELU(u), the exact erf form */
__global__ void __launch_bounds__(THREADS)
gelu(float *u, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) u[i] = 0.5f * u[i] * (1.0f + erff(u[i] * 0.70710678118654752f));
}

/* --- the weights on the GPU ---------------------------------------------------------------- */

/* float32 values of a tensor, dequantized on the host as the IR defines them (crystal.h's
 * crystal_dequant); free() them */
static float *host_values(const crystal_tensor *t) {
    size_t n = (size_t)t->rows * t->cols;
    float *v = (float *)malloc((n ? n : 1) * sizeof *v);
    if (!v) return NULL;
    for (int r = 0; r < t->rows; r++)
        for (int c = 0; c < t->cols; c++) v[(size_t)r * t->cols + c] = crystal_dequant(t, r, c);
    return v;
}

static float *upload(const float *host, size_t n) {
    float *dev = NULL;
    CK(cudaMalloc((void **)&dev, (n ? n : 1) * sizeof *dev), "cudaMalloc");
    if (n) CK(cudaMemcpy(dev, host, n * sizeof *dev, cudaMemcpyHostToDevice), "cudaMemcpy to the GPU");
    return dev;
}

static float *upload_tensor(const crystal_tensor *t) {
    float *host = host_values(t);
    if (!host) return NULL;
    float *dev = upload(host, (size_t)t->rows * t->cols);
    free(host);
    return dev;
}

static float *zeros(size_t n) {
    float *dev = NULL;
    CK(cudaMalloc((void **)&dev, (n ? n : 1) * sizeof *dev), "cudaMalloc");
    CK(cudaMemset(dev, 0, (n ? n : 1) * sizeof *dev), "cudaMemset");
    return dev;
}

typedef struct { float *w, *b; } dev_layer_norm;

typedef struct {
    dev_layer_norm ln1, ln2, ln3;
    float *qw, *qb, *kw, *kb, *vw, *vb, *ow, *ob;
    float *positions, *values, *temperature;
    float *fc1w, *fc1b, *fc2w, *fc2b;
    float *kc, *vc;  /* the KV cache, [n_ctx, D] each */
} dev_block;

struct crystal_work {
    float *embed, *pos_embed, *head_w, *head_b;
    dev_layer_norm ln_f;
    dev_block *blocks;
    float *x, *h, *q, *y, *u, *scores, *w, *logits;  /* activations on the GPU */
    float **owned;  /* every GPU array above, for crystal_state_free */
    int n_owned, cap_owned;
    int failed;     /* a host allocation failed on the way */
};

/* dev, remembered for crystal_state_free; a NULL (a failed host allocation) marks the state failed */
static float *keep(struct crystal_work *wk, float *dev) {
    if (!dev) {
        wk->failed = 1;
        return NULL;
    }
    if (wk->n_owned == wk->cap_owned) {
        int cap = wk->cap_owned ? 2 * wk->cap_owned : 64;
        float **grown = (float **)realloc(wk->owned, (size_t)cap * sizeof *grown);
        if (!grown) {
            cudaFree(dev);
            wk->failed = 1;
            return NULL;
        }
        wk->owned = grown;
        wk->cap_owned = cap;
    }
    wk->owned[wk->n_owned++] = dev;
    return dev;
}

extern "C" int crystal_state_init(crystal_state *s, const crystal_model *m) {
    int d = m->d_model, t = m->n_ctx;
    struct crystal_work *wk = (struct crystal_work *)calloc(1, sizeof *wk);
    dev_block *blocks = (dev_block *)calloc((size_t)m->n_blocks, sizeof *blocks);
    float *logits = (float *)malloc((size_t)m->vocab_size * sizeof *logits);
    if (!wk || !blocks || !logits) {
        free(wk);
        free(blocks);
        free(logits);
        return -1;
    }
    wk->blocks = blocks;
    s->work = wk;
    s->logits = logits;
    wk->embed = keep(wk, upload_tensor(&m->token_embed));
    wk->pos_embed = keep(wk, upload_tensor(&m->pos_embed));
    /* an untied head arrives plain, [V, D]: the CUDA backend never lays out crystal_forward.c's tiles */
    wk->head_w = m->tie_head ? wk->embed : keep(wk, upload_tensor(&m->head_weight));
    wk->head_b = keep(wk, upload_tensor(&m->head_bias));
    if (m->final_norm) {
        wk->ln_f.w = keep(wk, upload_tensor(&m->ln_f.weight));
        wk->ln_f.b = keep(wk, upload_tensor(&m->ln_f.bias));
    }
    int max_n = 1;
    for (int b = 0; b < m->n_blocks; b++) {
        const crystal_block *src = &m->blocks[b];
        dev_block *dst = &blocks[b];
        dst->ln1.w = keep(wk, upload_tensor(&src->ln1.weight));
        dst->ln1.b = keep(wk, upload_tensor(&src->ln1.bias));
        dst->ln2.w = keep(wk, upload_tensor(&src->ln2.weight));
        dst->ln2.b = keep(wk, upload_tensor(&src->ln2.bias));
        dst->ln3.w = keep(wk, upload_tensor(&src->ln3.weight));
        dst->ln3.b = keep(wk, upload_tensor(&src->ln3.bias));
        dst->qw = keep(wk, upload_tensor(&src->attn.q_weight));
        dst->qb = keep(wk, upload_tensor(&src->attn.q_bias));
        dst->kw = keep(wk, upload_tensor(&src->attn.k_weight));
        dst->kb = keep(wk, upload_tensor(&src->attn.k_bias));
        dst->vw = keep(wk, upload_tensor(&src->attn.v_weight));
        dst->vb = keep(wk, upload_tensor(&src->attn.v_bias));
        dst->ow = keep(wk, upload_tensor(&src->attn.out_weight));
        dst->ob = keep(wk, upload_tensor(&src->attn.out_bias));
        dst->positions = keep(wk, upload_tensor(&src->field.positions));
        dst->values = keep(wk, upload_tensor(&src->field.values));
        dst->temperature = keep(wk, upload_tensor(&src->field.temperature));
        dst->fc1w = keep(wk, upload_tensor(&src->ffn.fc1_weight));
        dst->fc1b = keep(wk, upload_tensor(&src->ffn.fc1_bias));
        dst->fc2w = keep(wk, upload_tensor(&src->ffn.fc2_weight));
        dst->fc2b = keep(wk, upload_tensor(&src->ffn.fc2_bias));
        dst->kc = keep(wk, zeros((size_t)t * d));
        dst->vc = keep(wk, zeros((size_t)t * d));
        if (src->field.n_neurons > max_n) max_n = src->field.n_neurons;
    }
    wk->x = keep(wk, zeros((size_t)d));
    wk->h = keep(wk, zeros((size_t)d));
    wk->q = keep(wk, zeros((size_t)d));
    wk->y = keep(wk, zeros((size_t)d));
    wk->u = keep(wk, zeros((size_t)m->ffn_hidden));
    wk->scores = keep(wk, zeros((size_t)m->n_heads * t));
    wk->w = keep(wk, zeros((size_t)max_n));
    wk->logits = keep(wk, zeros((size_t)m->vocab_size));
    if (wk->failed) {
        crystal_state_free(s);
        return -1;
    }
    return 0;
}

extern "C" void crystal_state_free(crystal_state *s) {
    struct crystal_work *wk = s->work;
    if (!wk) return;
    for (int i = 0; i < wk->n_owned; i++) cudaFree(wk->owned[i]);
    free(wk->owned);
    free(wk->blocks);
    free(wk);
    free(s->logits);
    s->work = NULL;
    s->logits = NULL;
}

extern "C" int crystal_set_threads(int n) {
    (void)n;  /* the GPU's threads are its own: --threads changes nothing here */
    return 0;
}

static int rows_grid(int rows) { return (rows * 32 + THREADS - 1) / THREADS; }

/* --- the ops made of several kernels, named after the IR ops as crystal_forward.c's ---------- */

/* ffn: x += fc2(GELU(fc1(h))), u holding the hidden layer */
static void ffn(const dev_block *bl, const float *h, int d, int f, float *u, float *x) {
    LAUNCH(linear, rows_grid(f), THREADS, bl->fc1w, bl->fc1b, h, f, d, u, 0);
    LAUNCH(gelu, (f + THREADS - 1) / THREADS, THREADS, u, f);
    LAUNCH(linear, rows_grid(d), THREADS, bl->fc2w, bl->fc2b, u, d, f, x, 1);
}

/* head: logits[V] = W h + b (W the token embedding when tied) */
static void head(const struct crystal_work *wk, const float *h, int v, int d, float *logits) {
    LAUNCH(linear, rows_grid(v), THREADS, wk->head_w, wk->head_b, h, v, d, logits, 0);
}

extern "C" const float *crystal_forward(const crystal_model *m, crystal_state *s, int token, int pos, int want_logits) {
    struct crystal_work *wk = s->work;
    int d = m->d_model, f = m->ffn_hidden, hd = d / m->n_heads;
    LAUNCH(token_embedding, 1, THREADS, wk->embed, wk->pos_embed, token, pos, d, wk->x);
    for (int b = 0; b < m->n_blocks; b++) {
        dev_block *bl = &wk->blocks[b];
        LAUNCH(layer_norm, 1, THREADS, wk->x, bl->ln1.w, bl->ln1.b, d, m->ln_eps, wk->h);
        LAUNCH(linear, rows_grid(d), THREADS, bl->qw, bl->qb, wk->h, d, d, wk->q, 0);
        LAUNCH(linear, rows_grid(d), THREADS, bl->kw, bl->kb, wk->h, d, d, bl->kc + (size_t)pos * d, 0);
        LAUNCH(linear, rows_grid(d), THREADS, bl->vw, bl->vb, wk->h, d, d, bl->vc + (size_t)pos * d, 0);
        LAUNCH(causal_attention, m->n_heads, THREADS, wk->q, bl->kc, bl->vc, pos, d, hd, m->n_ctx, wk->scores,
               wk->y);
        LAUNCH(linear, rows_grid(d), THREADS, bl->ow, bl->ob, wk->y, d, d, wk->x, 1);
        int n = m->blocks[b].field.n_neurons;
        if (n) {
            LAUNCH(layer_norm, 1, THREADS, wk->x, bl->ln2.w, bl->ln2.b, d, m->ln_eps, wk->h);
            LAUNCH(neuron_field, 1, THREADS, wk->h, bl->positions, bl->values, bl->temperature, n, d,
                   m->field_norm, m->field_eps, wk->w, wk->x);
        }
        LAUNCH(layer_norm, 1, THREADS, wk->x, bl->ln3.w, bl->ln3.b, d, m->ln_eps, wk->h);
        ffn(bl, wk->h, d, f, wk->u, wk->x);
    }
    CK(cudaGetLastError(), "kernel launch");
    /* a kernel's fault surfaces at the next synchronising call: wait here, so that it is named a kernel's
     * and this position's (not a copy's, nor a later position's when no logits are copied back) */
    CK(cudaDeviceSynchronize(), "kernel execution");
    if (!want_logits) return NULL;
    const float *src = wk->x;
    if (m->final_norm) {
        LAUNCH(layer_norm, 1, THREADS, wk->x, wk->ln_f.w, wk->ln_f.b, d, m->ln_eps, wk->h);
        src = wk->h;
    }
    head(wk, src, m->vocab_size, d, wk->logits);
    CK(cudaGetLastError(), "kernel launch");
    CK(cudaDeviceSynchronize(), "kernel execution");
    CK(cudaMemcpy(s->logits, wk->logits, (size_t)m->vocab_size * sizeof *s->logits, cudaMemcpyDeviceToHost),
       "cudaMemcpy from the GPU");
    return s->logits;
}

extern "C" const float *crystal_forward_window(const crystal_model *m, crystal_state *s, const int32_t *ids, int start,
                                               int n, int want_logits) {
    const float *logits = NULL;
    for (int i = 0; i < n; i++) logits = crystal_forward(m, s, ids[i], start + i, want_logits && i == n - 1);
    return logits;
}

extern "C" int crystal_forward_sequence(const crystal_model *m, const int32_t *ids, int n, float *out) {
    if (n < 1 || n > m->n_ctx) return -1;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab_size) return -1;
    crystal_state s;
    if (crystal_state_init(&s, m)) return -1;
    for (int i = 0; i < n; i++) {
        const float *logits = crystal_forward(m, &s, ids[i], i, 1);
        memcpy(out + (size_t)i * m->vocab_size, logits, (size_t)m->vocab_size * sizeof *out);
    }
    crystal_state_free(&s);
    return 0;
}

/* Called by main() before anything else: one line and exit status 2 when no GPU can run us. */
extern "C" int crystal_cuda_check(const char *prog) {
    cuda_prog = prog;
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
        fprintf(stderr, "%s: error: no usable CUDA GPU (%s)\n", prog,
                err != cudaSuccess ? cudaGetErrorString(err) : "none found");
        return -1;
    }
    return 0;
}
