/* crystal_forward.c: the forward pass of the spec (shared/spec/model.md) over a crystal_model.
 *
 * A forward computes a run of positions start .. start+n-1 together, with a KV cache for the
 * positions before `start`: n = 1 is decoding one token, n > 1 a prompt or a window recompute
 * after a shift. Each function carries the name of the IR op it computes (token_embedding,
 * layer_norm, causal_attention, neuron_field, ffn, head).
 *
 * Why it is shaped this way (docs/backends.md has the measurements):
 * - Over n positions every sublayer is a small matrix product (n x D x 3D for q/k/v, n x D x N
 *   for the field's distances, n x N x D for its weighted sum, n x D x F and n x F x D for the
 *   FFN). One kernel, `matmul`, computes them all from weights packed once at start-up:
 *   transposed to [K][columns], dequantised to float32, zero-padded to whole register tiles,
 *   so a tile of MR rows x NR columns stays in registers while K streams past and no dot
 *   product needs a horizontal sum. n = 1 runs the same kernel with one row.
 * - Only what the wanted logits read is computed: when generating, the last position's. The
 *   last block computes its keys and values for every position but the rest of itself only
 *   for that one (see blocks), and the head (V x D, the biggest matrix by far) runs once. It
 *   is packed once too, in tiles of HEAD_TILE rows stored transposed, float32 or int16 codes
 *   as they are: a tile's HEAD_TILE sums stay in registers while D columns stream past, so it
 *   runs at memory speed without the horizontal additions a row-by-row dot product needs;
 *   codes are converted to float exactly and their scale applied once per row:
 *   s sum_k code_k h_k + o sum_k h_k. int8 codes take byte dot products instead (gemv_i8).
 * - exp (field weights, softmax) and erf (GELU) are small vectorisable polynomials instead of
 *   libm calls, which no compiler vectorises without -ffast-math. Measured: fast_exp within
 *   1 ulp of glibc's expf on [-87.3, 0] (20 million points), fast_erf within 2.5e-7 of erf
 *   (absolute, on [-10, 10]); both far below the 1e-4 logit tolerance.
 * - Multiply-adds use fmaf where the machine has a fused multiply-add (FP_FAST_FMAF), else
 *   a * b + c. Builds pass -ffp-contract=off so that the compiler fuses nothing by itself:
 *   a dequantised weight is (float)code * scale + offset with two roundings, as the IR has it.
 */
#if defined(__linux__) && !defined(_DEFAULT_SOURCE)
#define _DEFAULT_SOURCE /* posix_memalign and madvise, also under -std=c99 */
#endif
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif

#include "crystal.h"

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#include <immintrin.h> /* the byte dot products of i8_tile */
#endif

/* The int8 byte-dot-product paths (packed_i8, gemv_i8) pay only with an instruction that does
 * them, AVX-512 VNNI's vpdpbusd: measured on an AVX2 build, their plain-C loop ran the bench
 * model 2.4x slower than the paths it replaces. Elsewhere int8 weights keep those paths (block
 * products in float32, the head in head_i8), which compilers vectorise from plain C.
 * -DCRYSTAL_BYTE_DOT=1 forces the byte paths (the tests check the plain loop that way). */
#ifndef CRYSTAL_BYTE_DOT
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define CRYSTAL_BYTE_DOT 1
#else
#define CRYSTAL_BYTE_DOT 0
#endif
#endif

#ifdef FP_FAST_FMAF
#define MADD(a, b, c) fmaf((a), (b), (c))
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* --threads: independent output tiles in parallel when built with OpenMP (-fopenmp in
 * CFLAGS). Each tile is computed by one thread in the same order whatever the thread count,
 * so the results are the same bits. A loop runs in parallel only when its local `parallel`
 * says it is big enough (PARALLEL_WORK multiply-adds) to pay for a fork and join. */
#ifdef _OPENMP
#include <omp.h>
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static) if (parallel)")
#else
#define PARALLEL_FOR
#endif
#define PARALLEL_WORK 200000.0

int crystal_set_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
    return 0;
#else
    return n == 1 ? 0 : -1;
#endif
}

/* A matmul register tile: MR rows x NR columns of partial sums, sized to the register file
 * (measured on an AMD EPYC with gcc 12 -O3: AVX-512 8 x 32, 16 of its 32 registers, 25%
 * faster than 4 x 32; compiled for AVX2, 4 x 24, twelve of 16, was the best, 8 x 32 spills). */
#if defined(__AVX512F__)
#define MR 8
#define NR 32
#elif defined(__AVX__)
#define MR 4
#define NR 24
#else
#define MR 4
#define NR 32
#endif
#define ALIGN 64 /* bytes: every buffer starts on a cache line */

static int round_up(int n, int m) { return (n + m - 1) / m * m; }

/* --- fast elementwise functions ------------------------------------------------------------ */

/* e^x for x <= 88: 2^k * e^r with k = round(x / ln 2) and |r| <= ln 2 / 2, e^r by its Taylor
 * series to degree 7 (truncation below 6e-9 relative). Below -87.3 (where expf goes subnormal)
 * it returns 0: the field's far neurons and masked scores, whose weight is nothing anyway. */
static inline float fast_exp(float x) {
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    /* Written so that NaN clamps to 0 (NaN fails every comparison): converting a NaN k to an
     * integer is undefined behaviour, and a NaN input still returns NaN below. */
    float xc = x >= -87.3f ? (x <= 88.0f ? x : 88.0f) : (x < -87.3f ? -87.3f : 0.0f);
    float k = (xc * 1.44269504f + shifter) - shifter;
    float r = (xc - k * 0.693145752f) - k * 1.42860677e-6f; /* ln 2 in two parts: exact k * hi */
    float p = 1.0f / 5040.0f;
    p = MADD(p, r, 1.0f / 720.0f);
    p = MADD(p, r, 1.0f / 120.0f);
    p = MADD(p, r, 1.0f / 24.0f);
    p = MADD(p, r, 1.0f / 6.0f);
    p = MADD(p, r, 0.5f);
    p = MADD(p, r, 1.0f);
    p = MADD(p, r, 1.0f);
    int32_t bits = ((int32_t)k + 127) * (1 << 23);
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.3f ? 0.0f : x == x ? p * scale : x;
}

/* erf(x), odd in x. |x| < 0.75: its Maclaurin series to x^15 (truncation below 2e-8 relative);
 * beyond: Abramowitz & Stegun 7.1.26, 1 - t (a1 + t (a2 + ...)) e^{-x^2} with t = 1 / (1 + p|x|),
 * whose absolute error is below 1.5e-7 (the series keeps small |x|, where erf is small, from
 * losing digits to 1 - (nearly 1)). Both are computed and one kept, so the loop vectorises. */
static inline float fast_erf(float x) {
    float a = fabsf(x), a2 = a * a;
    float t = 1.0f / (1.0f + 0.3275911f * a);
    float y = 1.061405429f;
    y = MADD(y, t, -1.453152027f);
    y = MADD(y, t, 1.421413741f);
    y = MADD(y, t, -0.284496736f);
    y = MADD(y, t, 0.254829592f);
    float far = 1.0f - y * t * fast_exp(-a2);
    float z = -1.0f / 75600.0f; /* 2/sqrt(pi) (a - a^3/3 + a^5/10 - a^7/42 + ...) */
    z = MADD(z, a2, 1.0f / 9360.0f);
    z = MADD(z, a2, -1.0f / 1320.0f);
    z = MADD(z, a2, 1.0f / 216.0f);
    z = MADD(z, a2, -1.0f / 42.0f);
    z = MADD(z, a2, 1.0f / 10.0f);
    z = MADD(z, a2, -1.0f / 3.0f);
    z = MADD(z, a2, 1.0f);
    float near = 1.12837917f * a * z;
    float e = a < 0.75f ? near : far;
    return x < 0.0f ? -e : e;
}

/* GELU in its exact erf form: 0.5 x (1 + erf(x / sqrt 2)) */
static inline float gelu(float x) { return 0.5f * x * (1.0f + fast_erf(x * 0.707106781f)); }

#define LANES 16 /* partial sums per row: one AVX-512 register, two AVX ones */

/* the partial sums added pairwise, in a fixed order */
static float sum_lanes(const float *a) {
    float b[LANES / 2];
    for (int k = 0; k < LANES / 2; k++) b[k] = a[k] + a[k + LANES / 2];
    return ((b[0] + b[4]) + (b[2] + b[6])) + ((b[1] + b[5]) + (b[3] + b[7]));
}

/* Sums over a row: LANES partial sums (a chain of dependent additions does not vectorise),
 * then sum_lanes. */
static float sum_f32(const float *restrict x, int n) {
    float a[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) a[k] += x[i + k];
    float acc = sum_lanes(a);
    for (; i < n; i++) acc += x[i];
    return acc;
}

/* sum_k (x_k - mean)^2 */
static float sum_sq_dev(const float *restrict x, float mean, int n) {
    float a[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float c = x[i + k] - mean;
            a[k] = MADD(c, c, a[k]);
        }
    float acc = sum_lanes(a);
    for (; i < n; i++) acc = MADD(x[i] - mean, x[i] - mean, acc);
    return acc;
}

static float max_f32(const float *restrict x, int n) {
    float a[LANES];
    for (int k = 0; k < LANES; k++) a[k] = -INFINITY;
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) a[k] = x[i + k] > a[k] ? x[i + k] : a[k];
    float best = -INFINITY;
    for (int k = 0; k < LANES; k++) best = a[k] > best ? a[k] : best;
    for (; i < n; i++) best = x[i] > best ? x[i] : best;
    return best;
}

/* --- reading weights ----------------------------------------------------------------------- */

/* scale and offset of the segment of row r that holds column c (crystal.h's crystal_scale_index) */
static void quant_params(const crystal_tensor *t, int r, int c, float *scale, float *offset) {
    size_t i = crystal_scale_index(t, r, c);
    *scale = t->scale[i];
    *offset = t->offset ? t->offset[i] : 0.0f;
}

/* Row r as float32 values into out[cols]: each code read as (float)code * scale + offset,
 * exactly crystalc.ir.tensor.dequantize (crystal.h's crystal_dequant, a segment's scale and
 * offset looked up once). */
static void row_values(const crystal_tensor *t, int r, float *out) {
    size_t base = (size_t)r * (size_t)t->cols;
    if (t->dtype == CRYSTAL_F32) {
        memcpy(out, (const float *)t->data + base, (size_t)t->cols * sizeof *out);
        return;
    }
    int width = crystal_segment_width(t);
    int n_segments = (t->cols + width - 1) / width;
    for (int g = 0; g < n_segments; g++) {
        int c0 = g * width, c1 = c0 + width < t->cols ? c0 + width : t->cols;
        float s, o;
        quant_params(t, r, c0, &s, &o);
        if (t->dtype == CRYSTAL_I8) {
            const int8_t *code = (const int8_t *)t->data + base;
            for (int c = c0; c < c1; c++) out[c] = crystal_dequant_code((float)code[c], s, o);
        } else {
            const int16_t *code = (const int16_t *)t->data + base;
            for (int c = c0; c < c1; c++) out[c] = crystal_dequant_code((float)code[c], s, o);
        }
    }
}

/* --- the state: packed weights and activations, carved from one allocation ----------------- */

#define I8_TILE 64 /* rows of an int8 tile: four AVX-512 registers of int32 sums per digit */
#define I8_MAX_COLS 65536 /* keeps every integer sum of gemv_i8 exact (see there) */

/* An int8 matrix W [rows][cols] (tensor or row scheme: one scale and offset per row) as tiles
 * of I8_TILE rows; within a tile, four consecutive columns of each row lie side by side,
 * [cols4/4][I8_TILE][4] (columns past cols and rows past rows are zero codes): the layout of a
 * 4-way byte dot product instruction (AVX-512 VNNI's vpdpbusd), whose 32-bit lane j sums row
 * j's four products, so a tile's sums need no horizontal additions and a step of four columns
 * reads I8_TILE * 4 consecutive bytes. rows == 0: there is none. */
typedef struct {
    int8_t *codes;
    int32_t *code_sum;          /* [rows rounded up to I8_TILE] each row's codes summed */
    int64_t *code_sq;           /* [rows rounded up to I8_TILE] their squares summed, or NULL */
    float *scale, *offset;      /* [rows rounded up to I8_TILE] */
    float *in_scale;            /* [cols] or NULL: the product's input is x_k * in_scale_k */
    float *scaled;              /* [cols] scratch for that input, scaled or not */
    uint8_t *digits;            /* [3][cols4] scratch: the bytes of the input's integer form */
    int rows, cols, cols4;
} packed_i8;

/* A weight matrix W [cols][K] of the model stored as its transpose [K][ld]: row k holds
 * W[0..cols)[k], then zeros up to ld = cols rounded up to NR. An int8 matrix (tensor or row
 * scheme) also keeps its codes in i8 for single rows, i.e. decoding one token, where every
 * product streams its weights once and reads each only once: there gemv_i8 multiplies the
 * codes themselves, a quarter of the bytes. i8.rows == 0: float32 only. */
typedef struct {
    float *w;
    int k, cols, ld;
    packed_i8 i8;
} packed;

typedef struct {
    float *ln1_w, *ln1_b, *ln2_w, *ln2_b, *ln3_w, *ln3_b;
    packed q;                   /* [D][D] */
    packed kv;                  /* k and v projections side by side: [D][2D] */
    float *qkv_b;               /* [3D]: q's, k's and v's biases */
    packed out;                 /* [D][D] */
    float *out_b;
    packed positions;           /* field neuron positions, transposed: [D][N] */
    float *denominator;         /* [N] |tau_j| + 0.1 */
    packed values;              /* field values as they are: [N][D] (K = N) */
    packed fc1, fc2;            /* [D][F], [F][D] */
    float *fc1_b, *fc2_b;
} block_weights;

struct crystal_work {
    char *arena;                /* every pointer below points into it */
    block_weights *blocks;
    float *lnf_w, *lnf_b, *head_b;
    int d, t, t_pad, kv_ld;
    float *x, *h, *y, *f;       /* [T][D] residual, sublayer input, attention output, sublayer output */
    float *qkv;                 /* [T][3D] */
    float *hid;                 /* [T][F] */
    float *fw;                  /* [T][max N] field weights */
    float *att;                 /* [T][T_pad] attention scores, then weights */
    float *row;                 /* [max(V, D, F, N, T)] one dequantised row */
    float *codes;               /* [4 D] four rows of the head's integer codes as floats */
    int16_t *h_high, *h_low;    /* [D] h as an integer in two halves, for an int8 head */
    int32_t *head_high, *head_low; /* [V] an int8 head's integer sums */
    double *head_dot;           /* [V] */
    void *head_tiles;           /* the head packed in tiles (see pack_head), or NULL */
    int head_dtype;             /* of head_tiles: float32, int8 or int16 codes */
    float *head_scale, *head_offset; /* [V rounded up to HEAD_TILE] per row, for codes */
    packed_i8 head_i8;          /* an int8 head (tensor or row scheme), or rows 0 */
    float *key_t;               /* [L][D][T_pad] keys, transposed: one head's scores are a matmul */
    float *value;               /* [L][T][kv_ld] values */
};

/* Bump allocation from the arena; with arena == NULL it only counts. */
static void *take(char *arena, size_t *used, size_t bytes) {
    void *p = arena ? arena + *used : NULL;
    *used += (bytes + ALIGN - 1) / ALIGN * ALIGN;
    return p;
}

#define TAKE(n) take(arena, used, (size_t)(n) * sizeof(float))

/* W [cols][k] -> packed [k][round_up(cols, NR)] (dequantised, zero padded); tensors side by
 * side when several share one product (q, k, v). */
static packed pack_transposed(char *arena, size_t *used, const crystal_tensor *const *ws, int n_ws, float *row) {
    packed p = {.w = NULL, .k = ws[0]->cols, .cols = 0, .ld = 0};
    for (int i = 0; i < n_ws; i++) p.cols += ws[i]->rows;
    p.ld = round_up(p.cols, NR);
    p.w = TAKE((size_t)p.k * p.ld);
    if (!arena) return p;
    memset(p.w, 0, (size_t)p.k * p.ld * sizeof(float));
    int c0 = 0;
    for (int i = 0; i < n_ws; i++) {
        for (int r = 0; r < ws[i]->rows; r++) {
            row_values(ws[i], r, row);
            for (int k = 0; k < p.k; k++) p.w[(size_t)k * p.ld + c0 + r] = row[k];
        }
        c0 += ws[i]->rows;
    }
    return p;
}

/* W [k][cols] as it is -> packed [k][round_up(cols, NR)] */
static packed pack_rows(char *arena, size_t *used, const crystal_tensor *w) {
    packed p = {.w = NULL, .k = w->rows, .cols = w->cols, .ld = round_up(w->cols, NR)};
    p.w = TAKE((size_t)p.k * p.ld);
    if (!arena) return p;
    memset(p.w, 0, (size_t)p.k * p.ld * sizeof(float));
    for (int r = 0; r < w->rows; r++) row_values(w, r, p.w + (size_t)r * p.ld);
    return p;
}

static float *vector(char *arena, size_t *used, const crystal_tensor *t) {
    float *v = TAKE(t->cols);
    if (arena) row_values(t, 0, v);
    return v;
}

#define HEAD_TILE CRYSTAL_HEAD_TILE /* head rows summed together: eight AVX-512 registers of partial sums */

static int i8_packable(const crystal_tensor *t) {
    return CRYSTAL_BYTE_DOT && t->dtype == CRYSTAL_I8 && t->scheme != CRYSTAL_Q_GROUP && t->cols <= I8_MAX_COLS;
}

/* Room for an int8 matrix of `rows` x `cols` (see packed_i8), zeroed; in_scale and code_sq
 * only when asked for. */
static packed_i8 take_i8(char *arena, size_t *used, int rows, int cols, int in_scale, int squares) {
    packed_i8 p = {0};
    p.rows = rows;
    p.cols = cols;
    p.cols4 = round_up(cols, 4);
    int pad = round_up(rows, I8_TILE);
    p.codes = take(arena, used, (size_t)pad * p.cols4);
    p.code_sum = take(arena, used, (size_t)pad * sizeof(int32_t));
    p.code_sq = squares ? take(arena, used, (size_t)pad * sizeof(int64_t)) : NULL;
    p.digits = take(arena, used, (size_t)3 * p.cols4);
    p.scale = TAKE(pad);
    p.offset = TAKE(pad);
    p.in_scale = in_scale ? TAKE(cols) : NULL;
    p.scaled = TAKE(cols);
    if (!arena) return p;
    memset(p.codes, 0, (size_t)pad * p.cols4);
    memset(p.code_sum, 0, (size_t)pad * sizeof(int32_t));
    if (squares) memset(p.code_sq, 0, (size_t)pad * sizeof(int64_t));
    memset(p.digits, 0, (size_t)3 * p.cols4);
    memset(p.scale, 0, (size_t)pad * sizeof(float));
    memset(p.offset, 0, (size_t)pad * sizeof(float));
    return p;
}

/* code into row `row`, column k of a packed int8 matrix */
static void put_i8(packed_i8 *p, int row, int k, int8_t code) {
    p->codes[(size_t)(row / I8_TILE) * I8_TILE * p->cols4 + (size_t)(k / 4) * 4 * I8_TILE + (row % I8_TILE) * 4 +
             k % 4] = code;
    p->code_sum[row] += code;
    if (p->code_sq) p->code_sq[row] += (int64_t)code * code;
}

/* Tensors of the same column count, their rows one after another, packed as one int8 matrix
 * (see packed_i8); rows 0 unless every one is int8 under the tensor or row scheme. Each row's
 * codes are summed once here for the integer form's bias (gemv_i8), and with `squares` their
 * squares too (field_sqdist_i8). */
static packed_i8 pack_i8(char *arena, size_t *used, const crystal_tensor *const *ts, int n_ts, int squares) {
    int rows = 0;
    for (int i = 0; i < n_ts; i++) {
        if (!i8_packable(ts[i]) || ts[i]->cols != ts[0]->cols) return (packed_i8){0};
        rows += ts[i]->rows;
    }
    packed_i8 p = take_i8(arena, used, rows, ts[0]->cols, 0, squares);
    if (!arena) return p;
    for (int i = 0, r0 = 0; i < n_ts; r0 += ts[i]->rows, i++) {
        const int8_t *src = (const int8_t *)ts[i]->data;
        for (int r = 0; r < ts[i]->rows; r++) {
            for (int k = 0; k < p.cols; k++) put_i8(&p, r0 + r, k, src[(size_t)r * p.cols + k]);
            quant_params(ts[i], r, 0, p.scale + r0 + r, p.offset + r0 + r);
        }
    }
    return p;
}

/* An int8 W [K][cols] whose scales belong to its K rows (the field's values, one row a
 * neuron), for products x W summing over K: packed transposed, rows = cols of W. Under the
 * tensor scheme every output row takes W's one scale and offset; under the row scheme the
 * scales move to the input, x_k * s_k (in_scale), and the offsets must be 0. Rows 0 when
 * neither holds. */
static packed_i8 pack_i8_columns(char *arena, size_t *used, const crystal_tensor *t) {
    if (!i8_packable(t) || t->rows > I8_MAX_COLS) return (packed_i8){0};
    int by_row = t->scheme == CRYSTAL_Q_ROW;
    for (int r = 0; by_row && r < t->rows; r++)
        if (t->offset && t->offset[r] != 0.0f) return (packed_i8){0};
    packed_i8 p = take_i8(arena, used, t->cols, t->rows, by_row, 0);
    if (!arena) return p;
    const int8_t *src = (const int8_t *)t->data;
    for (int r = 0; r < t->rows; r++) {
        for (int c = 0; c < t->cols; c++) put_i8(&p, c, r, src[(size_t)r * t->cols + c]);
        if (by_row) {
            float offset;
            quant_params(t, r, 0, p.in_scale + r, &offset);
        }
    }
    for (int c = 0; c < t->cols; c++) {
        if (by_row) {
            p.scale[c] = 1.0f;
        } else {
            quant_params(t, 0, 0, p.scale + c, p.offset + c);
        }
    }
    return p;
}

/* pack_transposed, plus the int8 codes for single rows when there are any */
static packed pack_product(char *arena, size_t *used, const crystal_tensor *const *ws, int n_ws, float *row,
                           int squares) {
    packed p = pack_transposed(arena, used, ws, n_ws, row);
    p.i8 = pack_i8(arena, used, ws, n_ws, squares);
    return p;
}

/* The head W [V][D] as tiles of HEAD_TILE rows, each stored transposed [D][HEAD_TILE] (rows
 * past V are zeros), codes kept as codes: one tile's logits are HEAD_TILE independent sums
 * that stay in registers while its columns stream past, with no horizontal additions.
 * An int8 head under the tensor or row scheme is packed for gemv_i8 instead; int8 codes
 * under the group scheme, and int16 ones, are left in place (head_i8 and head_codes read
 * them). */
static void pack_head(const crystal_model *m, struct crystal_work *w, char *arena, size_t *used) {
    const crystal_tensor *t = m->tie_head ? &m->token_embed : &m->head_weight;
    w->head_tiles = NULL;
    w->head_scale = w->head_offset = NULL;
    w->head_i8 = (packed_i8){0};
    w->head_dtype = t->dtype;
    if (m->head_tiles && !m->tie_head && t->dtype == CRYSTAL_F32) { /* laid out by the compiler */
        w->head_tiles = (void *)m->head_tiles; /* only ever read */
        return;
    }
    if (i8_packable(t)) {
        w->head_i8 = pack_i8(arena, used, &t, 1, 0);
        return;
    }
    if (t->dtype == CRYSTAL_I8 || (t->dtype != CRYSTAL_F32 && t->scheme == CRYSTAL_Q_GROUP)) return;
    int v_pad = round_up(t->rows, HEAD_TILE), d = t->cols;
    size_t size = t->dtype == CRYSTAL_F32 ? sizeof(float) : t->dtype == CRYSTAL_I8 ? 1 : 2;
    char *tiles = take(arena, used, (size_t)v_pad * d * size);
    if (t->dtype != CRYSTAL_F32) {
        w->head_scale = TAKE(v_pad);
        w->head_offset = TAKE(v_pad);
    }
    if (!arena) return;
    memset(tiles, 0, (size_t)v_pad * d * size);
#define TRANSPOSE_TILES(TYPE)                                                      \
    for (int r0 = 0; r0 < t->rows; r0 += HEAD_TILE) {                             \
        TYPE *dst = (TYPE *)tiles + (size_t)r0 * d;                               \
        const TYPE *src = (const TYPE *)t->data + (size_t)r0 * d;                 \
        int n = t->rows - r0 < HEAD_TILE ? t->rows - r0 : HEAD_TILE;              \
        for (int k = 0; k < d; k++)                                               \
            for (int j = 0; j < n; j++) dst[(size_t)k * HEAD_TILE + j] = src[(size_t)j * d + k]; \
    }
    if (t->dtype == CRYSTAL_F32) TRANSPOSE_TILES(float)
    else if (t->dtype == CRYSTAL_I8) TRANSPOSE_TILES(int8_t)
    else TRANSPOSE_TILES(int16_t)
#undef TRANSPOSE_TILES
    if (t->dtype != CRYSTAL_F32)
        for (int r = 0; r < v_pad; r++) {
            float s = 0.0f, o = 0.0f;
            if (r < t->rows) quant_params(t, r, 0, &s, &o);
            w->head_scale[r] = s;
            w->head_offset[r] = o;
        }
    w->head_tiles = tiles;
}

/* Lay out (arena == NULL: only measure) the packed weights and the buffers. */
static void layout(const crystal_model *m, struct crystal_work *w, char *arena, size_t *used) {
    int d = m->d_model, t = m->n_ctx, f = m->ffn_hidden, n_max = 1, big = m->vocab_size;
    for (int b = 0; b < m->n_blocks; b++)
        if (m->blocks[b].field.n_neurons > n_max) n_max = m->blocks[b].field.n_neurons;
    if (f > big) big = f;
    if (d > big) big = d;
    if (t > big) big = t;
    if (n_max > big) big = n_max;
    w->d = d;
    w->t = t;
    w->t_pad = round_up(t, NR);
    w->kv_ld = d + NR; /* a head's last tile may read NR columns past its start */
    w->row = TAKE(big);
    w->codes = TAKE(4 * d);
    w->h_high = take(arena, used, (size_t)d * sizeof(int16_t));
    w->h_low = take(arena, used, (size_t)d * sizeof(int16_t));
    w->head_high = take(arena, used, (size_t)m->vocab_size * sizeof(int32_t));
    w->head_low = take(arena, used, (size_t)m->vocab_size * sizeof(int32_t));
    w->head_dot = take(arena, used, (size_t)m->vocab_size * sizeof(double));
    if (arena) memset(w->head_dot, 0, (size_t)m->vocab_size * sizeof(double));
    w->blocks = take(arena, used, (size_t)m->n_blocks * sizeof *w->blocks);
    for (int b = 0; b < m->n_blocks; b++) {
        const crystal_block *blk = &m->blocks[b];
        block_weights bw;
        bw.ln1_w = vector(arena, used, &blk->ln1.weight);
        bw.ln1_b = vector(arena, used, &blk->ln1.bias);
        bw.ln2_w = vector(arena, used, &blk->ln2.weight);
        bw.ln2_b = vector(arena, used, &blk->ln2.bias);
        bw.ln3_w = vector(arena, used, &blk->ln3.weight);
        bw.ln3_b = vector(arena, used, &blk->ln3.bias);
        const crystal_tensor *q = &blk->attn.q_weight, *kv[2] = {&blk->attn.k_weight, &blk->attn.v_weight};
        bw.q = pack_product(arena, used, &q, 1, w->row, 0);
        bw.kv = pack_product(arena, used, kv, 2, w->row, 0);
        bw.qkv_b = TAKE(3 * d);
        if (arena) {
            row_values(&blk->attn.q_bias, 0, bw.qkv_b);
            row_values(&blk->attn.k_bias, 0, bw.qkv_b + d);
            row_values(&blk->attn.v_bias, 0, bw.qkv_b + 2 * d);
        }
        const crystal_tensor *out = &blk->attn.out_weight;
        bw.out = pack_product(arena, used, &out, 1, w->row, 0);
        bw.out_b = vector(arena, used, &blk->attn.out_bias);
        const crystal_neuron_field *nf = &blk->field;
        packed none = {0};
        bw.positions = bw.values = none;
        bw.denominator = NULL;
        if (nf->n_neurons > 0) {
            const crystal_tensor *pos = &nf->positions;
            bw.positions = pack_product(arena, used, &pos, 1, w->row, 1);
            /* the distance form needs one offset for every neuron: tensor scheme, or row with 0 */
            for (int j = 1; j < bw.positions.i8.rows && arena; j++)
                if (bw.positions.i8.offset[j] != bw.positions.i8.offset[0]) bw.positions.i8.rows = 0;
            bw.values = pack_rows(arena, used, &nf->values);
            bw.values.i8 = pack_i8_columns(arena, used, &nf->values);
            bw.denominator = vector(arena, used, &nf->temperature);
            if (arena)
                for (int j = 0; j < nf->n_neurons; j++) bw.denominator[j] = fabsf(bw.denominator[j]) + 0.1f;
        }
        const crystal_tensor *fc1 = &blk->ffn.fc1_weight, *fc2 = &blk->ffn.fc2_weight;
        bw.fc1 = pack_product(arena, used, &fc1, 1, w->row, 0);
        bw.fc1_b = vector(arena, used, &blk->ffn.fc1_bias);
        bw.fc2 = pack_product(arena, used, &fc2, 1, w->row, 0);
        bw.fc2_b = vector(arena, used, &blk->ffn.fc2_bias);
        if (arena) w->blocks[b] = bw;
    }
    w->lnf_w = w->lnf_b = NULL;
    if (m->final_norm) {
        w->lnf_w = vector(arena, used, &m->ln_f.weight);
        w->lnf_b = vector(arena, used, &m->ln_f.bias);
    }
    w->head_b = vector(arena, used, &m->head_bias);
    pack_head(m, w, arena, used);
    w->x = TAKE((size_t)t * d);
    w->h = TAKE((size_t)t * d);
    w->y = TAKE((size_t)t * d);
    w->f = TAKE((size_t)t * d);
    w->qkv = TAKE((size_t)t * 3 * d);
    w->hid = TAKE((size_t)t * f);
    w->fw = TAKE((size_t)t * round_up(n_max, NR));
    w->att = TAKE((size_t)t * w->t_pad);
    w->key_t = TAKE((size_t)m->n_blocks * d * w->t_pad);
    w->value = TAKE((size_t)m->n_blocks * t * w->kv_ld);
    /* the cache's padding is read (and multiplied by zero attention weights): it must be numbers */
    if (arena) {
        memset(w->key_t, 0, (size_t)m->n_blocks * d * w->t_pad * sizeof(float));
        memset(w->value, 0, (size_t)m->n_blocks * t * w->kv_ld * sizeof(float));
    }
}

/* The arena, in 2 MB pages where Linux offers them (transparent huge pages on request): the
 * packed weights are megabytes written once at start-up, and faulting them in 4 KB pages took
 * about half of a small program's start-up (2,000 page faults for the bench model). */
static char *alloc_arena(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    size_t huge = (size_t)2 << 20;
    if (bytes >= huge) {
        void *p = NULL;
        bytes = (bytes + huge - 1) / huge * huge;
        if (posix_memalign(&p, huge, bytes) != 0) return NULL;
        (void)madvise(p, bytes, MADV_HUGEPAGE); /* advice: without it, ordinary pages */
        return p;
    }
#endif
    return malloc(bytes);
}

int crystal_state_init(crystal_state *s, const crystal_model *m) {
    memset(s, 0, sizeof *s);
    struct crystal_work probe, *w = calloc(1, sizeof *w);
    size_t used = 0;
    layout(m, &probe, NULL, &used);
    float *logits = calloc((size_t)m->vocab_size, sizeof(float));
    char *raw = w && logits ? alloc_arena(used + ALIGN) : NULL;
    if (!raw) {
        free(w);
        free(logits);
        return -1;
    }
    w->arena = raw;
    char *arena = raw + (ALIGN - (uintptr_t)raw % ALIGN) % ALIGN;
    used = 0;
    layout(m, w, arena, &used);
    s->work = w;
    s->logits = logits;
    return 0;
}

void crystal_state_free(crystal_state *s) {
    if (s->work) free(s->work->arena);
    free(s->work);
    free(s->logits);
    memset(s, 0, sizeof *s);
}

/* --- int8 products of one row ------------------------------------------------------------- */

/* The unit of h's integer form, h_k ~ unit * H_k with |H_k| <= limit; 0 when some h_k is inf or
 * NaN: there is no integer form then (converting one would be undefined), and the float sums
 * would be inf or NaN, so the caller says NaN. */
static double integer_unit(const float *h, int cols, double limit) {
    /* on the bits: magnitudes of floats order as unsigned integers, and an integer maximum is a
     * reduction that vectorises (a float one is not without -ffast-math) */
    uint32_t top = 0, bad = 0;
    for (int k = 0; k < cols; k++) {
        uint32_t bits;
        memcpy(&bits, h + k, sizeof bits);
        uint32_t magnitude = bits & 0x7fffffffu;
        top = magnitude > top ? magnitude : top;
        bad |= magnitude >= 0x7f800000u; /* inf or NaN */
    }
    if (bad) return 0.0;
    float largest;
    memcpy(&largest, &top, sizeof largest);
    return top ? (double)largest / limit : 1.0;
}

static int32_t integer_of(float h, double unit) { return (int32_t)floor((double)h / unit + 0.5); }

/* One tile of a packed int8 matrix (pack_i8): sum[q][j] = sum_k digit_qk code_jk for
 * the tile's I8_TILE rows j and the three byte digits q of h's integer form. Each product is
 * at most 255 * 128 in magnitude, so a sum over I8_MAX_COLS columns stays inside int32. With
 * AVX-512 VNNI a step of four columns is four 64-byte loads and twelve byte dot products into
 * twelve independent sums (one chain per register would wait on the instruction's latency). */
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
static void i8_tile(const int8_t *tile, const uint8_t *digits, int d4, int32_t sum[3][I8_TILE]) {
    __m512i s[3][4];
    for (int q = 0; q < 3; q++)
        for (int p = 0; p < 4; p++) s[q][p] = _mm512_setzero_si512();
    for (int k = 0; k < d4; k += 4) {
        const int8_t *step = tile + (size_t)k * I8_TILE;
        __m512i c0 = _mm512_loadu_si512(step), c1 = _mm512_loadu_si512(step + 64);
        __m512i c2 = _mm512_loadu_si512(step + 128), c3 = _mm512_loadu_si512(step + 192);
        for (int q = 0; q < 3; q++) {
            int32_t four; /* digit q of columns k..k+3, the same for every row */
            memcpy(&four, digits + (size_t)q * d4 + k, 4);
            __m512i g = _mm512_set1_epi32(four);
            s[q][0] = _mm512_dpbusd_epi32(s[q][0], g, c0);
            s[q][1] = _mm512_dpbusd_epi32(s[q][1], g, c1);
            s[q][2] = _mm512_dpbusd_epi32(s[q][2], g, c2);
            s[q][3] = _mm512_dpbusd_epi32(s[q][3], g, c3);
        }
    }
    for (int q = 0; q < 3; q++)
        for (int p = 0; p < 4; p++) _mm512_storeu_si512(sum[q] + 16 * p, s[q][p]);
}
#else
static void i8_tile(const int8_t *tile, const uint8_t *digits, int d4, int32_t sum[3][I8_TILE]) {
    memset(sum, 0, 3 * I8_TILE * sizeof(int32_t));
    for (int k = 0; k < d4; k += 4)
        for (int q = 0; q < 3; q++)
            for (int j = 0; j < I8_TILE; j++)
                for (int i = 0; i < 4; i++)
                    sum[q][j] += (int32_t)digits[(size_t)q * d4 + k + i] * tile[(size_t)k * I8_TILE + 4 * j + i];
}
#endif

/* x as the integer form of the comment below, its three bytes per column into p->digits;
 * returns the unit, or 0 when x has an inf or NaN. */
static double i8_digits(const packed_i8 *p, const float *x) {
    double unit = integer_unit(x, p->cols, 8388608.0 - 16.0);
    if (unit == 0.0) return 0.0;
    /* a multiply by the inverse (it vectorises; a division does not): X_k may then miss the
     * integer nearest to x_k / unit by one, x_k stays within one unit of unit * X_k, and every
     * sum below is exact for the X_k chosen */
    double inverse = 1.0 / unit;
    const float *restrict in = x;
    uint8_t *restrict d0 = p->digits, *restrict d1 = d0 + p->cols4, *restrict d2 = d1 + p->cols4;
    for (int k = 0; k < p->cols; k++) {
        uint32_t biased = (uint32_t)((int32_t)floor((double)in[k] * inverse + 0.5) + (1 << 23));
        d0[k] = (uint8_t)biased;
        d1[k] = (uint8_t)(biased >> 8);
        d2[k] = (uint8_t)(biased >> 16);
    }
    return unit;
}

/* dot[j] = sum_k code_jk X_k, exactly, for the rows of tile tb (X: the digits' integers).
 * Every term and partial sum is an integer below 2^53 (cols <= I8_MAX_COLS), so double
 * arithmetic is exact here, and it vectorises. */
static void i8_dots(const packed_i8 *p, int tb, double dot[I8_TILE]) {
    int32_t sum[3][I8_TILE];
    i8_tile(p->codes + (size_t)tb * I8_TILE * p->cols4, p->digits, p->cols4, sum);
    const int32_t *restrict code_sum = p->code_sum + (size_t)tb * I8_TILE;
    double *restrict out = dot;
    for (int j = 0; j < I8_TILE; j++)
        out[j] = (double)sum[0][j] + 256.0 * sum[1][j] + 65536.0 * sum[2][j] - 8388608.0 * code_sum[j];
}

/* The massive elements of x: the largest n <= I8_PEAKS elements whose magnitudes each exceed 16 times
 * every other's, their indices into at[]; returns n, 0 when there are none or any is inf or NaN.
 * The integer form below holds every element to max|x| 2^-24; a few such elements (a residual
 * stream's massive activations) would take the others' digits. */
#define I8_PEAKS 4
static int massive_elements(const float *x, int cols, int at[I8_PEAKS]) {
    float top[I8_PEAKS + 1] = {0}; /* the largest magnitudes, descending, and their indices */
    int idx[I8_PEAKS + 1] = {0};
    for (int k = 0; k < cols; k++) {
        float a = fabsf(x[k]);
        if (!(a <= FLT_MAX)) return 0;
        if (a <= top[I8_PEAKS]) continue;
        int j = I8_PEAKS;
        for (; j > 0 && a > top[j - 1]; j--) {
            top[j] = top[j - 1];
            idx[j] = idx[j - 1];
        }
        top[j] = a;
        idx[j] = k;
    }
    for (int n = I8_PEAKS; n > 0; n--) /* the most that stand apart: the rest's unit is then smallest */
        if (n < cols && top[n - 1] > 16.0f * top[n]) {
            memcpy(at, idx, (size_t)n * sizeof *at);
            return n;
        }
    return 0;
}

/* y[r] = sum_k W[r][k] x[k] for a packed int8 matrix, in integer arithmetic: x_k = unit * X_k
 * with integers |X_k| < 2^23 (the rounding moves x_k by at most max|x| 2^-24: float32's
 * relative precision, but of the largest element; up to I8_PEAKS elements 16 times the rest are
 * taken out and their columns added in float, so that the others keep their digits), and X_k + 2^23,
 * which is positive and below 2^24, written as three bytes (digits), so that
 * sum_k code_k X_k = sum_q 2^(8q) sum_k code_k digit_qk - 2^23 sum_k code_k: byte dot
 * products, which the hardware does 64 at a time, and each row's code sum from start-up.
 * The total is exact in int64 and in double (below 2^53 for cols <= I8_MAX_COLS); each row's
 * scale and offset are applied once, s * unit * sum + o * sum_k x_k: the sum of the
 * dequantised weights in another order, a few ulp apart. */
static void gemv_i8(const packed_i8 *p, const float *x, const float *bias, float *y) {
    int rows = p->rows, tiles = (rows + I8_TILE - 1) / I8_TILE, parallel = (double)rows * p->cols >= PARALLEL_WORK;
    (void)parallel;
    float *xs = p->scaled;
    if (p->in_scale)
        for (int k = 0; k < p->cols; k++) xs[k] = x[k] * p->in_scale[k];
    else
        memcpy(xs, x, (size_t)p->cols * sizeof *xs);
    int peak[I8_PEAKS] = {0}, peaks = massive_elements(xs, p->cols, peak);
    float x_peak[I8_PEAKS] = {0};
    for (int i = 0; i < peaks; i++) {
        x_peak[i] = xs[peak[i]];
        xs[peak[i]] = 0.0f;
    }
    double unit = i8_digits(p, xs);
    if (unit == 0.0) {
        for (int r = 0; r < rows; r++) y[r] = NAN;
        return;
    }
    float sum_x = sum_f32(xs, p->cols);
    PARALLEL_FOR
    for (int tb = 0; tb < tiles; tb++) {
        double dot[I8_TILE];
        i8_dots(p, tb, dot);
        int r0 = tb * I8_TILE, n = rows - r0 < I8_TILE ? rows - r0 : I8_TILE;
        const float *restrict scale = p->scale + r0, *restrict offset = p->offset + r0;
        float *restrict out = y + r0;
        for (int j = 0; j < n; j++) out[j] = scale[j] * (float)(dot[j] * unit) + offset[j] * sum_x;
        for (int i = 0; i < peaks; i++) { /* a peak's column: its codes lie 4 apart in the tile's step of four */
            const int8_t *col =
                p->codes + (size_t)tb * I8_TILE * p->cols4 + (size_t)(peak[i] / 4) * 4 * I8_TILE + peak[i] % 4;
            for (int j = 0; j < n; j++)
                out[j] += (float)((double)scale[j] * col[4 * j] * x_peak[i] + (double)offset[j] * x_peak[i]);
        }
        if (bias)
            for (int j = 0; j < n; j++) out[j] += bias[r0 + j];
    }
}

/* Squared distances d2[n] = sum_k (h_k - p_nk)^2 from one row h to every neuron, with int8
 * positions p_nk = s_n c_nk + o (one offset o for all). With e = h - o as integers E_k (unit
 * as in gemv_i8), d2 = unit^2 sum_k E_k^2 - 2 s_n unit sum_k c_nk E_k + s_n^2 sum_k c_nk^2: three
 * exact integer sums, combined in double. That is the exact distance from e rounded to 24 bits,
 * so there is no cancellation to fear when h is near a neuron: the error is at most about
 * unit sqrt(D d2), against float32 rounding of the direct form's D terms. */
static void field_sqdist_i8(const packed_i8 *p, const float *h, float *e, float *d2) {
    int rows = p->rows, tiles = (rows + I8_TILE - 1) / I8_TILE, parallel = (double)rows * p->cols >= PARALLEL_WORK;
    (void)parallel;
    double o = p->offset[0], e2 = 0.0;
    for (int k = 0; k < p->cols; k++) e[k] = (float)((double)h[k] - o);
    double unit = i8_digits(p, e);
    if (unit == 0.0) {
        for (int r = 0; r < rows; r++) d2[r] = NAN;
        return;
    }
    const uint8_t *d0 = p->digits, *d1 = d0 + p->cols4, *d2b = d1 + p->cols4;
    for (int k = 0; k < p->cols; k++) { /* E_k back from its digits: the very integers the dots use */
        double whole = (double)(d0[k] + 256 * d1[k] + 65536 * d2b[k]) - 8388608.0;
        e2 += whole * whole; /* each below 2^46: exact in double */
    }
    PARALLEL_FOR
    for (int tb = 0; tb < tiles; tb++) {
        double dot[I8_TILE];
        i8_dots(p, tb, dot);
        int r0 = tb * I8_TILE, n = rows - r0 < I8_TILE ? rows - r0 : I8_TILE;
        for (int j = 0; j < n; j++) {
            double s = p->scale[r0 + j];
            double d = unit * unit * e2 - 2.0 * s * unit * dot[j] + s * s * (double)p->code_sq[r0 + j];
            d2[r0 + j] = d > 0.0 ? (float)d : 0.0f;
        }
    }
}

/* --- matmul: the one kernel behind every product over positions ----------------------------- */

/* c[i][j] = sum_k a[i][k] * b[k][j] (+ bias[j]) for i < rows, j < b->cols: a row-major with
 * lda, c with ldc. Tiles of MR rows x NR columns are summed in registers over the whole of K;
 * the packed b's zero padding lets every tile read NR columns. */
#define TILE_LOOP(R)                                                                           \
    for (int k = 0; k < kk; k++) {                                                            \
        const float *restrict bk = b + (size_t)k * ldb;                                       \
        for (int r = 0; r < (R); r++) {                                                       \
            float ar = a[(size_t)r * lda + k];                                                \
            for (int j = 0; j < NR; j++) acc[r][j] = MADD(ar, bk[j], acc[r][j]);              \
        }                                                                                     \
    }

static void tile(const float *restrict a, int lda, const float *restrict b, int ldb, int kk, int rows, int cols,
                 const float *bias, float *restrict c, int ldc) {
    float acc[MR][NR] = {{0}};
    if (rows == MR) {
        TILE_LOOP(MR)
    } else {
        for (int r = 0; r < rows; r++) {
            float a1[NR] = {0};
            const float *ar = a + (size_t)r * lda;
            for (int k = 0; k < kk; k++) {
                const float *restrict bk = b + (size_t)k * ldb;
                for (int j = 0; j < NR; j++) a1[j] = MADD(ar[k], bk[j], a1[j]);
            }
            memcpy(acc[r], a1, sizeof a1);
        }
    }
    for (int r = 0; r < rows; r++) {
        float *cr = c + (size_t)r * ldc;
        if (bias)
            for (int j = 0; j < cols; j++) cr[j] = acc[r][j] + bias[j];
        else
            for (int j = 0; j < cols; j++) cr[j] = acc[r][j];
    }
}

/* One row a[K] times WIDE_BLOCKS * NR full columns of b: a single row gives a tile only NR
 * independent sums, whose multiply-add chains would wait on each other's latency (decoding
 * one token is all single rows), so it takes several column blocks at once. Each sum is still
 * one chain over k in order, the same bits as in `tile`. */
#define WIDE_BLOCKS 4
static void row_tile(const float *restrict a, const float *restrict b, int ldb, int kk, const float *bias,
                     float *restrict c) {
    float acc[WIDE_BLOCKS * NR] = {0};
    for (int k = 0; k < kk; k++) {
        const float *restrict bk = b + (size_t)k * ldb;
        float ak = a[k];
        for (int j = 0; j < WIDE_BLOCKS * NR; j++) acc[j] = MADD(ak, bk[j], acc[j]);
    }
    if (bias)
        for (int j = 0; j < WIDE_BLOCKS * NR; j++) c[j] = acc[j] + bias[j];
    else
        memcpy(c, acc, sizeof acc);
}

/* b: K rows of at least round_up(cols, NR) readable floats, ldb apart. Rows in whole tiles of
 * MR first; the rows left over (all of them when rows < MR) in row_tile's wide blocks, except
 * for the last columns, which take `tile` one block at a time. */
static void matmul_raw(const float *a, int lda, int rows, const float *b, int ldb, int kk, int cols, const float *bias,
                       float *c, int ldc) {
    int parallel = (double)rows * cols * kk >= PARALLEL_WORK, blocks = (cols + NR - 1) / NR;
    int full = rows / MR * MR, wide = cols / (WIDE_BLOCKS * NR);
    (void)parallel;
    PARALLEL_FOR
    for (int jb = 0; jb < blocks; jb++) {
        int j = jb * NR, w = cols - j < NR ? cols - j : NR;
        for (int i = 0; i < full; i += MR)
            tile(a + (size_t)i * lda, lda, b + j, ldb, kk, MR, w, bias ? bias + j : NULL, c + (size_t)i * ldc + j,
                 ldc);
        if (full < rows && jb >= wide * WIDE_BLOCKS)
            tile(a + (size_t)full * lda, lda, b + j, ldb, kk, rows - full, w, bias ? bias + j : NULL,
                 c + (size_t)full * ldc + j, ldc);
    }
    parallel = (double)(rows - full) * cols * kk >= PARALLEL_WORK;
    PARALLEL_FOR
    for (int jw = 0; jw < wide; jw++) {
        int j = jw * WIDE_BLOCKS * NR;
        for (int i = full; i < rows; i++)
            row_tile(a + (size_t)i * lda, b + j, ldb, kk, bias ? bias + j : NULL, c + (size_t)i * ldc + j);
    }
}

static void matmul(const float *a, int lda, int rows, const packed *b, const float *bias, float *c, int ldc) {
    if (rows == 1 && b->i8.rows) {
        gemv_i8(&b->i8, a, bias, c);
        return;
    }
    matmul_raw(a, lda, rows, b->w, b->ld, b->k, b->cols, bias, c, ldc);
}

/* --- the ops ------------------------------------------------------------------------------- */

/* token_embedding + position_embedding: x[i] = E[ids[i]] + P[start + i] */
static void token_embedding(const crystal_model *m, struct crystal_work *w, const int32_t *ids, int start, int n) {
    int d = w->d;
    for (int i = 0; i < n; i++) {
        float *x = w->x + (size_t)i * d;
        row_values(&m->token_embed, ids[i], x);
        row_values(&m->pos_embed, start + i, w->row);
        for (int k = 0; k < d; k++) x[k] += w->row[k];
    }
}

/* layer_norm of n rows: (x - mean) / sqrt(var + eps) * weight + bias, biased variance over D */
static void layer_norm(const crystal_model *m, const float *wt, const float *bs, const float *x, float *out, int n) {
    int d = m->d_model;
    for (int i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d;
        float *oi = out + (size_t)i * d;
        float mean = sum_f32(xi, d) / (float)d;
        float sd = sqrtf(sum_sq_dev(xi, mean, d) / (float)d + m->ln_eps);
        for (int k = 0; k < d; k++) oi[k] = (xi[k] - mean) / sd * wt[k] + bs[k];
    }
}

/* causal_attention of positions start..start+n-1 (rows of w->h) in block `layer`: their keys
 * and values into the cache, then the queries of rows from..n-1 only (the others' outputs are
 * not wanted, see blocks): w->f rows 0..n-from-1 = Attn(w->h rows from..n-1) */
static void causal_attention(const crystal_model *m, struct crystal_work *w, const block_weights *bw, int layer,
                             int start, int n, int from) {
    int d = w->d, n_heads = m->n_heads, hd = d / n_heads, tp = w->t_pad;
    float *key_t = w->key_t + (size_t)layer * d * tp;
    float *value = w->value + (size_t)layer * w->t * w->kv_ld;
    matmul(w->h, d, n, &bw->kv, bw->qkv_b + d, w->qkv + d, 3 * d);
    if (from < n) matmul(w->h + (size_t)from * d, d, n - from, &bw->q, bw->qkv_b, w->qkv + (size_t)from * 3 * d, 3 * d);
    for (int i = 0; i < n; i++) {
        const float *k = w->qkv + (size_t)i * 3 * d + d, *v = k + d;
        for (int c = 0; c < d; c++) key_t[(size_t)c * tp + start + i] = k[c];
        memcpy(value + (size_t)(start + i) * w->kv_ld, v, (size_t)d * sizeof(float));
    }
    float scale = (float)sqrt((double)hd);
    if (from == n) return;
    for (int head = 0; head < n_heads; head++)
        for (int i0 = from; i0 < n; i0 += MR) {
            /* MR queries at a time, against the keys the last of them sees (the causal mask:
             * no product with a later position is computed, beyond this one tile's corner) */
            int rows = n - i0 < MR ? n - i0 : MR, seen = start + i0 + rows;
            float *att = w->att + (size_t)(i0 - from) * tp;
            matmul_raw(w->qkv + (size_t)i0 * 3 * d + head * hd, 3 * d, rows, key_t + (size_t)head * hd * tp, tp, hd,
                       seen, NULL, att, tp);
            for (int i = 0; i < rows; i++, att += tp) {
                int keys = start + i0 + i + 1; /* position start+i0+i sees positions 0..start+i0+i */
                for (int t = 0; t < keys; t++) att[t] = att[t] / scale;
                float max = max_f32(att, keys);
                for (int t = 0; t < keys; t++) att[t] = fast_exp(att[t] - max);
                float sum = sum_f32(att, keys);
                for (int t = 0; t < keys; t++) att[t] = att[t] / sum;
                for (int t = keys; t < seen; t++) att[t] = 0.0f;
            }
            matmul_raw(w->att + (size_t)(i0 - from) * tp, tp, rows, value + head * hd, w->kv_ld, seen, hd, NULL,
                       w->y + (size_t)(i0 - from) * d + head * hd, d);
        }
    matmul(w->y, d, n - from, &bw->out, bw->out_b, w->f, d);
}

/* Squared distances of one tile of rows of h to NR neurons (columns of the transposed
 * positions), in the spec's direct form sum_k (h_k - p_k)^2. */
static void sqdist_tile(const float *restrict h, int d, int rows, const float *restrict pt, int ldp,
                        float acc[MR][NR]) {
    memset(acc, 0, sizeof(float) * MR * NR);
    if (rows == MR) {
        for (int k = 0; k < d; k++) {
            const float *restrict pk = pt + (size_t)k * ldp;
            for (int r = 0; r < MR; r++) {
                float hr = h[(size_t)r * d + k];
                for (int j = 0; j < NR; j++) {
                    float e = hr - pk[j];
                    acc[r][j] = MADD(e, e, acc[r][j]);
                }
            }
        }
    } else {
        for (int r = 0; r < rows; r++) {
            float a1[NR] = {0};
            for (int k = 0; k < d; k++) {
                const float *restrict pk = pt + (size_t)k * ldp;
                float hr = h[(size_t)r * d + k];
                for (int j = 0; j < NR; j++) {
                    float e = hr - pk[j];
                    a1[j] = MADD(e, e, a1[j]);
                }
            }
            memcpy(acc[r], a1, sizeof a1);
        }
    }
}

/* neuron_field of n rows of w->h: w->f = sum_j w_j val_j, w_j = exp(-|h - pos_j| / (|tau_j| + 0.1)),
 * normalised to sum 1 (plus eps) when field_norm. Distance, sqrt and exp are one pass over
 * register tiles; the weighted sum of the values is a matmul. */
static void neuron_field(const crystal_model *m, struct crystal_work *w, const block_weights *bw,
                         const crystal_neuron_field *nf, int n) {
    int d = w->d, nn = nf->n_neurons;
    if (nn == 0) {
        memset(w->f, 0, (size_t)n * d * sizeof(float));
        return;
    }
    int ldw = round_up(nn, NR);
    int parallel = (double)n * nn * d >= PARALLEL_WORK, blocks = (nn + NR - 1) / NR;
    (void)parallel;
    if (n == 1 && bw->positions.i8.rows) { /* one row, int8 positions: the distances in integers */
        field_sqdist_i8(&bw->positions.i8, w->h, w->row, w->fw);
        for (int j = 0; j < nn; j++) w->fw[j] = -sqrtf(w->fw[j]) / bw->denominator[j];
        blocks = 0;
    }
    PARALLEL_FOR
    for (int jb = 0; jb < blocks; jb++) {
        int j = jb * NR, cols = nn - j < NR ? nn - j : NR;
        const float *den = bw->denominator + j;
        float acc[MR][NR];
        for (int i = 0; i < n; i += MR) {
            int rows = n - i < MR ? n - i : MR;
            sqdist_tile(w->h + (size_t)i * d, d, rows, bw->positions.w + j, bw->positions.ld, acc);
            for (int r = 0; r < rows; r++) {
                float *out = w->fw + (size_t)(i + r) * ldw + j;
                for (int c = 0; c < cols; c++) out[c] = -sqrtf(acc[r][c]) / den[c];
            }
        }
    }
    /* fast_exp returns 0 below -87.3, where float32's exp is still subnormal (down to -103.97). A normalised
     * row whose largest weight is within 2^24 of that edge (exponent < -70) is all tiny weights whose ratios
     * are the result: take them from expf, as the spec's float32 does (with eps = 0, a row fast_exp zeroed
     * was 0/0 = NaN). The other rows lose only weights below 2^-24 of their largest. */
    PARALLEL_FOR
    for (int i = 0; i < n; i++) {
        float *fw = w->fw + (size_t)i * ldw, top = fw[0];
        for (int j = 1; j < nn; j++) top = fw[j] > top ? fw[j] : top;
        if (m->field_norm && top < -70.0f)
            for (int j = 0; j < nn; j++) fw[j] = expf(fw[j]);
        else
            for (int j = 0; j < nn; j++) fw[j] = fast_exp(fw[j]);
        if (m->field_norm) {
            float denom = sum_f32(fw, nn) + m->field_eps;
            for (int j = 0; j < nn; j++) fw[j] = fw[j] / denom;
        }
    }
    matmul(w->fw, ldw, n, &bw->values, NULL, w->f, d);
}

/* ffn of n rows: w->f = fc2(GELU(fc1(h))) */
static void ffn(const crystal_model *m, struct crystal_work *w, const block_weights *bw, int n) {
    int f = m->ffn_hidden;
    matmul(w->h, w->d, n, &bw->fc1, bw->fc1_b, w->hid, f);
    for (size_t i = 0; i < (size_t)n * f; i++) w->hid[i] = gelu(w->hid[i]);
    matmul(w->hid, f, n, &bw->fc2, bw->fc2_b, w->f, w->d);
}

static void residual_add(float *restrict x, const float *restrict f, size_t n) {
    for (size_t i = 0; i < n; i++) x[i] += f[i];
}

/* --- head: logits = h W^T + b, W [V][D] read in place (the token embedding when tied) -------- */

/* Four float32 rows (`stride` apart) dotted with x[n]: x is read once for the four, and four
 * independent chains keep the adders busy. */
static void dot4_f32(const float *restrict w, size_t stride, const float *restrict x, int n, float *out) {
    const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float xi = x[i + k];
            a0[k] = MADD(w0[i + k], xi, a0[k]);
            a1[k] = MADD(w1[i + k], xi, a1[k]);
            a2[k] = MADD(w2[i + k], xi, a2[k]);
            a3[k] = MADD(w3[i + k], xi, a3[k]);
        }
    float s0 = sum_lanes(a0), s1 = sum_lanes(a1), s2 = sum_lanes(a2), s3 = sum_lanes(a3);
    for (; i < n; i++) {
        s0 = MADD(w0[i], x[i], s0);
        s1 = MADD(w1[i], x[i], s1);
        s2 = MADD(w2[i], x[i], s2);
        s3 = MADD(w3[i], x[i], s3);
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

/* Rows of integer codes dotted with h: sum_k (code_k s + o) h_k = s sum_k code_k h_k + o sum_k h_k
 * per row segment (the same sum rounded differently, a few ulp, with a quarter of the
 * arithmetic). Four rows at a time are converted to float (exactly) in one simple loop that
 * vectorises, then dotted as float32. */
static void head_codes(const crystal_tensor *t, struct crystal_work *w, const float *h, float *logits) {
    int rows = t->rows, cols = t->cols, width = crystal_segment_width(t);
    int n_segments = (cols + width - 1) / width;
    float part[4], *sum_x = w->row;   /* h summed over each segment, for the offsets */
    float *restrict codes = w->codes; /* four rows of codes as floats */
    for (int g = 0; g < n_segments; g++) {
        int c0 = g * width;
        sum_x[g] = sum_f32(h + c0, cols - c0 < width ? cols - c0 : width);
    }
    size_t n4 = (size_t)4 * cols;
    for (int r = 0; r < rows; r += 4) {
        int r0 = r + 4 <= rows ? r : rows - 4; /* the last four rows overlap when V % 4 != 0 */
        if (t->dtype == CRYSTAL_I8) {
            const int8_t *restrict c = (const int8_t *)t->data + (size_t)r0 * cols;
            for (size_t k = 0; k < n4; k++) codes[k] = (float)c[k];
        } else {
            const int16_t *restrict c = (const int16_t *)t->data + (size_t)r0 * cols;
            for (size_t k = 0; k < n4; k++) codes[k] = (float)c[k];
        }
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int g = 0; g < n_segments; g++) {
            int c0 = g * width, n = cols - c0 < width ? cols - c0 : width;
            dot4_f32(codes + c0, (size_t)cols, h + c0, n, part);
            for (int i = 0; i < 4; i++) {
                float s, o;
                quant_params(t, r0 + i, c0, &s, &o);
                acc[i] += s * part[i] + o * sum_x[g];
            }
        }
        for (int i = 0; i < 4; i++) logits[r0 + i] = acc[i];
    }
}

/* One tile of the packed head: out[j] = sum_k tile[k][j] h[k], codes converted exactly. */
#define DEFINE_HEAD_TILE(NAME, TYPE)                                                           \
    static void NAME(const TYPE *restrict tile, int d, const float *restrict h, float *restrict out) { \
        float acc[HEAD_TILE] = {0};                                                           \
        for (int k = 0; k < d; k++) {                                                         \
            const TYPE *restrict tk = tile + (size_t)k * HEAD_TILE;                          \
            float hk = h[k];                                                                  \
            for (int j = 0; j < HEAD_TILE; j++) acc[j] = MADD(hk, (float)tk[j], acc[j]);      \
        }                                                                                     \
        memcpy(out, acc, sizeof acc);                                                         \
    }
DEFINE_HEAD_TILE(head_tile_f32, float)
DEFINE_HEAD_TILE(head_tile_i16, int16_t)

/* The packed head: logits[v] = sum_k W[v][k] h[k], and for codes (tensor or row scheme)
 * s_v sum_k code_vk h_k + o_v sum_k h_k: the dequantised sum rounded differently (a few ulp)
 * with a quarter of the arithmetic. */
static void head_tiles(struct crystal_work *w, int rows, int d, const float *h, float *logits) {
    float sum_h = sum_f32(h, d);
    int parallel = (double)rows * d >= PARALLEL_WORK, tiles = (rows + HEAD_TILE - 1) / HEAD_TILE;
    (void)parallel;
    PARALLEL_FOR
    for (int tb = 0; tb < tiles; tb++) {
        int v0 = tb * HEAD_TILE;
        size_t at = (size_t)v0 * d;
        float out[HEAD_TILE];
        if (w->head_dtype == CRYSTAL_F32) head_tile_f32((const float *)w->head_tiles + at, d, h, out);
        else head_tile_i16((const int16_t *)w->head_tiles + at, d, h, out);
        int n = rows - v0 < HEAD_TILE ? rows - v0 : HEAD_TILE;
        if (w->head_dtype == CRYSTAL_F32)
            memcpy(logits + v0, out, (size_t)n * sizeof(float));
        else
            for (int j = 0; j < n; j++) logits[v0 + j] = w->head_scale[v0 + j] * out[j] + w->head_offset[v0 + j] * sum_h;
    }
}

/* int8 codes dotted with an integer vector held in two int16 halves: both sums exact in int32
 * for n <= 256 (|code| <= 128, |half| <= 2^15). Integer sums may be taken in any order, so a
 * compiler vectorises this with widening multiply-adds (vpmaddwd, or vpdpwssd with AVX-512
 * VNNI) and no float conversion. */
static void dot_i8_split(const int8_t *restrict c, const int16_t *restrict high, const int16_t *restrict low, int n,
                         int32_t *sum_high, int32_t *sum_low) {
    int32_t a = 0, b = 0;
    for (int k = 0; k < n; k++) {
        a += (int32_t)c[k] * high[k];
        b += (int32_t)c[k] * low[k];
    }
    *sum_high = a;
    *sum_low = b;
}

/* An int8 head: h is written as unit * H_k with integers |H_k| < 2^30 (the rounding moves h_k
 * by at most unit / 2 = max|h| 2^-31, far below float32's own precision), H_k = 2^15 high_k +
 * low_k; then sum_k code_k h_k = unit (2^15 sum code high + sum code low) with exact integer
 * sums, and each row segment's scale and offset are applied once:
 * s sum_k code_k h_k + o sum_k h_k. Converting every code to float instead was twice as slow. */
static void head_i8(const crystal_tensor *t, struct crystal_work *w, const float *h, float *logits) {
    int rows = t->rows, cols = t->cols, width = crystal_segment_width(t);
    int n_segments = (cols + width - 1) / width;
    double unit = integer_unit(h, cols, 1073741824.0 - 65536.0);
    if (unit == 0.0) {
        for (int r = 0; r < rows; r++) logits[r] = NAN;
        return;
    }
    for (int k = 0; k < cols; k++) {
        int32_t whole = integer_of(h[k], unit);
        int32_t low = ((whole % 32768) + 32768) % 32768;
        w->h_low[k] = (int16_t)low;
        w->h_high[k] = (int16_t)((whole - low) / 32768);
    }
    int32_t *high = w->head_high, *low = w->head_low;
    double *dot = w->head_dot;
    for (int g = 0; g < n_segments; g++) {
        int c0 = g * width, c1 = c0 + width < cols ? c0 + width : cols;
        for (int k = c0; k < c1; k += 256) { /* int32 stays exact over 256 columns */
            int n = c1 - k < 256 ? c1 - k : 256, parallel = (double)rows * n >= PARALLEL_WORK;
            (void)parallel;
            PARALLEL_FOR
            for (int r = 0; r < rows; r++)
                dot_i8_split((const int8_t *)t->data + (size_t)r * cols + k, w->h_high + k, w->h_low + k, n, high + r,
                             low + r);
            /* the first chunk starts the sums: dot times 0 rather than a branch (gcc 12 ran this
             * form 12% faster); dot only ever holds finite integer sums (zeroed at start-up), so
             * 0 * dot is 0 */
            double first = k == c0 ? 0.0 : 1.0;
            for (int r = 0; r < rows; r++) dot[r] = first * dot[r] + (32768.0 * high[r] + low[r]);
        }
        float sum_x = sum_f32(h + c0, c1 - c0);
        for (int r = 0; r < rows; r++) {
            size_t q = crystal_scale_index(t, r, c0);
            float o = t->offset ? t->offset[q] : 0.0f;
            logits[r] = (g ? logits[r] : 0.0f) + (t->scale[q] * (float)(dot[r] * unit) + o * sum_x);
        }
    }
}

/* logits[V] = W h + b for one row h[D] */
static void head(const crystal_model *m, struct crystal_work *w, const float *h, float *logits) {
    const crystal_tensor *t = m->tie_head ? &m->token_embed : &m->head_weight;
    int rows = t->rows, cols = t->cols;
    if (w->head_i8.rows) { /* it adds the bias itself */
        gemv_i8(&w->head_i8, h, w->head_b, logits);
        return;
    }
    if (w->head_tiles) {
        head_tiles(w, rows, cols, h, logits);
    } else if (t->dtype == CRYSTAL_I8) {
        head_i8(t, w, h, logits);
    } else if (rows >= 4) {
        head_codes(t, w, h, logits);
    } else { /* int16 codes under the group scheme, too few rows for four at a time */
        for (int i = 0; i < rows; i++) {
            row_values(t, i, w->row);
            float acc = 0.0f;
            for (int k = 0; k < cols; k++) acc = MADD(w->row[k], h[k], acc);
            logits[i] = acc;
        }
    }
    for (int i = 0; i < rows; i++) logits[i] += w->head_b[i];
}

/* --- forward ------------------------------------------------------------------------------- */

/* The blocks over positions start..start+n-1, of which only the last `live` rows' outputs are
 * wanted: n for every position's logits, 1 for the last position's, 0 to fill the cache.
 * Every block but the last needs all n rows (the next block's keys and values come from
 * them); the last one needs all n only up to its keys and values, and past them only the live
 * rows, each of whose sublayers (the attention's query and output, the field, the FFN) reads
 * no other row: computing the rest would be dead code. A one-block window recompute for the
 * last logits is then n rows of k and v and one row of everything else, with the same bits.
 * Leaves the live rows of the residual stream in w->x rows 0..live-1. */
static void blocks(const crystal_model *m, struct crystal_work *w, const int32_t *ids, int start, int n, int live) {
    token_embedding(m, w, ids, start, n);
    for (int b = 0; b < m->n_blocks; b++) {
        const block_weights *bw = &w->blocks[b];
        int from = b == m->n_blocks - 1 ? n - live : 0;
        layer_norm(m, bw->ln1_w, bw->ln1_b, w->x, w->h, n);
        causal_attention(m, w, bw, b, start, n, from);
        if (from > 0) { /* the live rows of the residual stream to the front, beside their attention */
            memmove(w->x, w->x + (size_t)from * w->d, (size_t)(n - from) * w->d * sizeof(float));
            n -= from;
        }
        if (n == 0) return;
        size_t nd = (size_t)n * w->d;
        residual_add(w->x, w->f, nd);
        layer_norm(m, bw->ln2_w, bw->ln2_b, w->x, w->h, n);
        neuron_field(m, w, bw, &m->blocks[b].field, n);
        residual_add(w->x, w->f, nd);
        layer_norm(m, bw->ln3_w, bw->ln3_b, w->x, w->h, n);
        ffn(m, w, bw, n);
        residual_add(w->x, w->f, nd);
    }
}

/* logits of row i of the residual stream */
static void logits_of(const crystal_model *m, struct crystal_work *w, int i, float *out) {
    const float *x = w->x + (size_t)i * w->d;
    if (m->final_norm) {
        layer_norm(m, w->lnf_w, w->lnf_b, x, w->h, 1);
        x = w->h;
    }
    head(m, w, x, out);
}

const float *crystal_forward_window(const crystal_model *m, crystal_state *s, const int32_t *ids, int start, int n,
                                    int want_logits) {
    blocks(m, s->work, ids, start, n, want_logits ? 1 : 0);
    if (!want_logits) return NULL;
    logits_of(m, s->work, 0, s->logits);
    return s->logits;
}

const float *crystal_forward(const crystal_model *m, crystal_state *s, int token, int pos, int want_logits) {
    int32_t id = token;
    return crystal_forward_window(m, s, &id, pos, 1, want_logits);
}

int crystal_forward_sequence(const crystal_model *m, const int32_t *ids, int n, float *out) {
    if (n < 1 || n > m->n_ctx) return -1;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab_size) return -1;
    crystal_state s;
    if (crystal_state_init(&s, m)) return -1;
    blocks(m, s.work, ids, 0, n, n);
    for (int i = 0; i < n; i++) logits_of(m, s.work, i, out + (size_t)i * (size_t)m->vocab_size);
    crystal_state_free(&s);
    return 0;
}
