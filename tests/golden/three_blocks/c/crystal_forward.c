/* crystal_forward.c: the forward pass of the spec (shared/spec/model.md) over a crystal_model.
 *
 * One position at a time with a KV cache, like llama2.c: crystal_forward() feeds one token
 * and mirrors the spec's formulas op by op; each function carries the name of the IR op it
 * computes (token_embedding, layer_norm, causal_attention, neuron_field, ffn, head).
 *
 * Weights are float32, or int8/int16 codes read as value = (float)code * scale + offset in
 * float32 (crystalc/ir/tensor.py dequantize). The multiply and the add are two roundings;
 * builds pass -ffp-contract=off so that no compiler fuses them. The dtype is switched on
 * once per row segment, never inside the inner loop, and the dot products keep eight
 * partial sums so that a compiler can vectorise them without reassociating anything.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "crystal.h"

/* --- reading weights -------------------------------------------------------------------- */

/* Columns that share one scale: the group under CRYSTAL_Q_GROUP, else the whole row. */
static int segment_width(const crystal_tensor *t) {
    return t->scheme == CRYSTAL_Q_GROUP && t->group > 0 ? t->group : t->cols;
}

/* scale and offset of segment g of row r */
static void quant_params(const crystal_tensor *t, int r, int g, int n_segments, float *scale, float *offset) {
    size_t i = 0;
    if (t->scheme == CRYSTAL_Q_ROW) i = (size_t)r;
    else if (t->scheme == CRYSTAL_Q_GROUP) i = (size_t)r * (size_t)n_segments + (size_t)g;
    *scale = t->scale[i];
    *offset = t->offset ? t->offset[i] : 0.0f;
}

/* Partial sums per dot product: 16 floats fill one AVX-512 register or two AVX ones, and
 * were the fastest choice measured with gcc -O2/-O3 (with and without -march=native) and
 * clang; 8 lets gcc -O3 -march=native vectorise the wrong loop and run 5x slower. */
#define LANES 16

/* the partial sums added pairwise, in a fixed order */
static float sum_lanes(const float *a) {
    float b[LANES / 2];
    for (int k = 0; k < LANES / 2; k++) b[k] = a[k] + a[k + LANES / 2];
    return ((b[0] + b[4]) + (b[2] + b[6])) + ((b[1] + b[5]) + (b[3] + b[7]));
}

static float dot_f32(const float *w, const float *x, int n) {
    float a[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) a[k] += w[i + k] * x[i + k];
    float acc = sum_lanes(a);
    for (; i < n; i++) acc += w[i] * x[i];
    return acc;
}

/* Four rows (`stride` floats apart) dotted with x at once: x is read once for the four, and
 * four independent chains of additions keep the adders busy. Each row's sum is formed in the
 * same order as dot_f32, so the results are the same bits. */
static void dot4_f32(const float *w, size_t stride, const float *x, int n, float *out) {
    const float *w0 = w, *w1 = w + stride, *w2 = w + 2 * stride, *w3 = w + 3 * stride;
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    int i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float xi = x[i + k];
            a0[k] += w0[i + k] * xi;
            a1[k] += w1[i + k] * xi;
            a2[k] += w2[i + k] * xi;
            a3[k] += w3[i + k] * xi;
        }
    float s0 = sum_lanes(a0), s1 = sum_lanes(a1), s2 = sum_lanes(a2), s3 = sum_lanes(a3);
    for (; i < n; i++) {
        s0 += w0[i] * x[i];
        s1 += w1[i] * x[i];
        s2 += w2[i] * x[i];
        s3 += w3[i] * x[i];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

/* The same dot product over integer codes, each dequantised exactly as the IR does. */
#define DEFINE_DOT_INT(NAME, CODE)                                              \
    static float NAME(const CODE *c, float s, float o, const float *x, int n) { \
        float a[LANES] = {0};                                                   \
        int i = 0;                                                              \
        for (; i + LANES <= n; i += LANES)                                      \
            for (int k = 0; k < LANES; k++) a[k] += ((float)c[i + k] * s + o) * x[i + k]; \
        float acc = sum_lanes(a);                                               \
        for (; i < n; i++) acc += ((float)c[i] * s + o) * x[i];                 \
        return acc;                                                             \
    }
DEFINE_DOT_INT(dot_i8, int8_t)
DEFINE_DOT_INT(dot_i16, int16_t)

/* Row r of a weight matrix, dotted with x[cols]. */
static float row_dot(const crystal_tensor *t, int r, const float *x) {
    size_t base = (size_t)r * (size_t)t->cols;
    if (t->dtype == CRYSTAL_F32) return dot_f32((const float *)t->data + base, x, t->cols);
    int width = segment_width(t);
    int n_segments = (t->cols + width - 1) / width;
    float acc = 0.0f;
    for (int g = 0; g < n_segments; g++) {
        int c0 = g * width;
        int n = t->cols - c0 < width ? t->cols - c0 : width;
        float s, o;
        quant_params(t, r, g, n_segments, &s, &o);
        if (t->dtype == CRYSTAL_I8) acc += dot_i8((const int8_t *)t->data + base + c0, s, o, x + c0, n);
        else acc += dot_i16((const int16_t *)t->data + base + c0, s, o, x + c0, n);
    }
    return acc;
}

/* Columns c0 .. c0+n-1 of row r as float32 values; returns a pointer to them (into the
 * weights themselves when float32, else into `out`, which receives n values). */
static const float *row_range(const crystal_tensor *t, int r, int c0, int n, float *out) {
    size_t base = (size_t)r * (size_t)t->cols;
    if (t->dtype == CRYSTAL_F32) return (const float *)t->data + base + c0;
    int width = segment_width(t);
    int n_segments = (t->cols + width - 1) / width;
    for (int c = c0; c < c0 + n;) {
        int g = c / width;
        int end = (g + 1) * width < c0 + n ? (g + 1) * width : c0 + n;
        float s, o;
        quant_params(t, r, g, n_segments, &s, &o);
        if (t->dtype == CRYSTAL_I8) {
            const int8_t *code = (const int8_t *)t->data + base;
            for (; c < end; c++) out[c - c0] = (float)code[c] * s + o;
        } else {
            const int16_t *code = (const int16_t *)t->data + base;
            for (; c < end; c++) out[c - c0] = (float)code[c] * s + o;
        }
    }
    return out;
}

/* Row r as float32 values. */
static const float *row_values(const crystal_tensor *t, int r, float *out) { return row_range(t, r, 0, t->cols, out); }

/* out[rows] = W x + b; `scratch` holds the dequantised bias. */
static void linear(const crystal_tensor *w, const crystal_tensor *b, const float *x, float *out, float *scratch) {
    int r = 0;
    if (w->dtype == CRYSTAL_F32)
        for (; r + 4 <= w->rows; r += 4)
            dot4_f32((const float *)w->data + (size_t)r * (size_t)w->cols, (size_t)w->cols, x, w->cols, out + r);
    for (; r < w->rows; r++) out[r] = row_dot(w, r, x);
    const float *bias = row_values(b, 0, scratch);
    for (r = 0; r < w->rows; r++) out[r] += bias[r];
}

/* --- the ops ---------------------------------------------------------------------------- */

/* token_embedding + position_embedding: x = E[token] + P[pos] */
static void token_embedding(const crystal_model *m, crystal_state *s, int token, int pos) {
    const float *e = row_values(&m->token_embed, token, s->row);
    const float *p = row_values(&m->pos_embed, pos, s->row2);
    for (int i = 0; i < m->d_model; i++) s->x[i] = e[i] + p[i];
}

/* layer_norm: (x - mean) / sqrt(var + eps) * weight + bias, biased variance over D */
static void layer_norm(const crystal_model *m, crystal_state *s, const crystal_layer_norm *ln, const float *x,
                       float *out) {
    int d = m->d_model;
    double sum = 0.0;
    for (int i = 0; i < d; i++) sum += x[i];
    float mean = (float)(sum / d);
    double sq = 0.0;
    for (int i = 0; i < d; i++) {
        float c = x[i] - mean;
        sq += (double)(c * c);
    }
    float sd = sqrtf((float)(sq / d) + m->ln_eps);
    const float *w = row_values(&ln->weight, 0, s->row);
    const float *b = row_values(&ln->bias, 0, s->row2);
    for (int i = 0; i < d; i++) out[i] = (x[i] - mean) / sd * w[i] + b[i];
}

/* causal_attention of position pos over positions 0..pos of block `layer`: s->f = Attn(s->h) */
static void causal_attention(const crystal_model *m, crystal_state *s, const crystal_causal_attention *a, int layer,
                             int pos) {
    int d = m->d_model, n_heads = m->n_heads, hd = d / n_heads;
    size_t layer_off = (size_t)layer * (size_t)m->n_ctx * (size_t)d;
    float *key = s->key_cache + layer_off + (size_t)pos * d;
    float *value = s->value_cache + layer_off + (size_t)pos * d;
    linear(&a->q_weight, &a->q_bias, s->h, s->q, s->row);
    linear(&a->k_weight, &a->k_bias, s->h, key, s->row);
    linear(&a->v_weight, &a->v_bias, s->h, value, s->row);
    float scale = (float)sqrt((double)hd);
    for (int head = 0; head < n_heads; head++) {
        const float *q = s->q + head * hd;
        float max = -INFINITY;
        const float *keys = s->key_cache + layer_off + head * hd;
        int t = 0;
        for (; t + 4 <= pos + 1; t += 4) dot4_f32(keys + (size_t)t * d, (size_t)d, q, hd, s->att + t);
        for (; t <= pos; t++) s->att[t] = dot_f32(q, keys + (size_t)t * d, hd);
        for (t = 0; t <= pos; t++) {
            float score = s->att[t] / scale;
            s->att[t] = score;
            if (score > max) max = score;
        }
        float sum = 0.0f;
        for (int t = 0; t <= pos; t++) {
            s->att[t] = expf(s->att[t] - max);
            sum += s->att[t];
        }
        float *y = s->y + head * hd;
        for (int i = 0; i < hd; i++) y[i] = 0.0f;
        for (int t = 0; t <= pos; t++) {
            float p = s->att[t] / sum;
            const float *v = s->value_cache + layer_off + (size_t)t * d + head * hd;
            for (int i = 0; i < hd; i++) y[i] += p * v[i];
        }
    }
    linear(&a->out_weight, &a->out_bias, s->y, s->f, s->row);
}

/* Squared distances from h[d] to four neuron positions at once (rows `stride` floats apart),
 * each summed in the same order as one at a time. */
static void sqdist4(const float *h, const float *p, size_t stride, int d, float *out) {
    const float *p0 = p, *p1 = p + stride, *p2 = p + 2 * stride, *p3 = p + 3 * stride;
    float a0[LANES] = {0}, a1[LANES] = {0}, a2[LANES] = {0}, a3[LANES] = {0};
    int i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float e0 = h[i + k] - p0[i + k], e1 = h[i + k] - p1[i + k];
            float e2 = h[i + k] - p2[i + k], e3 = h[i + k] - p3[i + k];
            a0[k] += e0 * e0;
            a1[k] += e1 * e1;
            a2[k] += e2 * e2;
            a3[k] += e3 * e3;
        }
    float s0 = sum_lanes(a0), s1 = sum_lanes(a1), s2 = sum_lanes(a2), s3 = sum_lanes(a3);
    for (; i < d; i++) {
        float e0 = h[i] - p0[i], e1 = h[i] - p1[i], e2 = h[i] - p2[i], e3 = h[i] - p3[i];
        s0 += e0 * e0;
        s1 += e1 * e1;
        s2 += e2 * e2;
        s3 += e3 * e3;
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

static float sqdist(const float *h, const float *p, int d) {
    float a[LANES] = {0};
    int i = 0;
    for (; i + LANES <= d; i += LANES)
        for (int k = 0; k < LANES; k++) {
            float e = h[i + k] - p[i + k];
            a[k] += e * e;
        }
    float acc = sum_lanes(a);
    for (; i < d; i++) acc += (h[i] - p[i]) * (h[i] - p[i]);
    return acc;
}

#define FIELD_COLUMNS 32 /* output columns kept in registers while the neurons stream past */

/* neuron_field: s->f = sum_j w_j val_j, w_j = exp(-|h - pos_j| / (|tau_j| + 0.1)), normalised
 * to sum 1 (plus eps) when field_norm */
static void neuron_field(const crystal_model *m, crystal_state *s, const crystal_neuron_field *nf) {
    int d = m->d_model, n = nf->n_neurons;
    for (int i = 0; i < d; i++) s->f[i] = 0.0f;
    if (n == 0) return;
    /* distances: the squared norm of h - pos_j, four float32 neurons at a time */
    int j = 0;
    if (nf->positions.dtype == CRYSTAL_F32)
        for (; j + 4 <= n; j += 4)
            sqdist4(s->h, (const float *)nf->positions.data + (size_t)j * (size_t)d, (size_t)d, d, s->fw + j);
    for (; j < n; j++) s->fw[j] = sqdist(s->h, row_values(&nf->positions, j, s->row), d);
    const float *tau = row_values(&nf->temperature, 0, s->row2);
    float total = 0.0f;
    for (j = 0; j < n; j++) {
        s->fw[j] = expf(-sqrtf(s->fw[j]) / (fabsf(tau[j]) + 0.1f));
        total += s->fw[j];
    }
    if (m->field_norm)
        for (j = 0; j < n; j++) s->fw[j] = s->fw[j] / (total + m->field_eps);
    /* weighted sum of the values, a slice of output columns at a time */
    const float *f32_values = nf->values.dtype == CRYSTAL_F32 ? (const float *)nf->values.data : NULL;
    for (int c0 = 0; c0 < d; c0 += FIELD_COLUMNS) {
        int width = d - c0 < FIELD_COLUMNS ? d - c0 : FIELD_COLUMNS;
        float acc[FIELD_COLUMNS] = {0};
        for (j = 0; j < n; j++) {
            const float *v = f32_values ? f32_values + (size_t)j * (size_t)d + c0
                                        : row_range(&nf->values, j, c0, width, s->row);
            float w = s->fw[j];
            if (width == FIELD_COLUMNS)
                for (int i = 0; i < FIELD_COLUMNS; i++) acc[i] += w * v[i];
            else
                for (int i = 0; i < width; i++) acc[i] += w * v[i];
        }
        for (int i = 0; i < width; i++) s->f[c0 + i] = acc[i];
    }
}

/* GELU in its exact erf form, in double like the reference interpreter */
static float gelu(float x) { return (float)(0.5 * (double)x * (1.0 + erf((double)x / sqrt(2.0)))); }

/* ffn: s->f = fc2(GELU(fc1(h))) */
static void ffn(const crystal_model *m, crystal_state *s, const crystal_ffn *f) {
    linear(&f->fc1_weight, &f->fc1_bias, s->h, s->hid, s->row);
    for (int i = 0; i < m->ffn_hidden; i++) s->hid[i] = gelu(s->hid[i]);
    linear(&f->fc2_weight, &f->fc2_bias, s->hid, s->f, s->row);
}

/* head: logits = h W^T + b, W the token embedding when tied */
static void head(const crystal_model *m, crystal_state *s) {
    const crystal_tensor *w = m->tie_head ? &m->token_embed : &m->head_weight;
    linear(w, &m->head_bias, s->h, s->logits, s->row);
}

static void residual_add(float *x, const float *f, int d) {
    for (int i = 0; i < d; i++) x[i] += f[i];
}

/* --- forward ---------------------------------------------------------------------------- */

const float *crystal_forward(const crystal_model *m, crystal_state *s, int token, int pos, int want_logits) {
    int d = m->d_model;
    token_embedding(m, s, token, pos);
    for (int b = 0; b < m->n_blocks; b++) {
        const crystal_block *blk = &m->blocks[b];
        layer_norm(m, s, &blk->ln1, s->x, s->h);
        causal_attention(m, s, &blk->attn, b, pos);
        residual_add(s->x, s->f, d);
        layer_norm(m, s, &blk->ln2, s->x, s->h);
        neuron_field(m, s, &blk->field);
        residual_add(s->x, s->f, d);
        layer_norm(m, s, &blk->ln3, s->x, s->h);
        ffn(m, s, &blk->ffn);
        residual_add(s->x, s->f, d);
    }
    if (!want_logits) return NULL;
    if (m->final_norm) layer_norm(m, s, &m->ln_f, s->x, s->h);
    else memcpy(s->h, s->x, (size_t)d * sizeof *s->h);
    head(m, s);
    return s->logits;
}

int crystal_state_init(crystal_state *s, const crystal_model *m) {
    memset(s, 0, sizeof *s);
    size_t d = (size_t)m->d_model, t = (size_t)m->n_ctx;
    size_t n_max = 1, big = (size_t)m->vocab_size;
    for (int b = 0; b < m->n_blocks; b++)
        if ((size_t)m->blocks[b].field.n_neurons > n_max) n_max = (size_t)m->blocks[b].field.n_neurons;
    if ((size_t)m->ffn_hidden > big) big = (size_t)m->ffn_hidden;
    if (d > big) big = d;
    if (t > big) big = t;
    if (n_max > big) big = n_max;
    size_t cache = (size_t)m->n_blocks * t * d;
    s->x = calloc(d, sizeof(float));
    s->h = calloc(d, sizeof(float));
    s->q = calloc(d, sizeof(float));
    s->y = calloc(d, sizeof(float));
    s->f = calloc(d, sizeof(float));
    s->hid = calloc((size_t)m->ffn_hidden + 1, sizeof(float));
    s->att = calloc(t, sizeof(float));
    s->fw = calloc(n_max, sizeof(float));
    s->row = calloc(big, sizeof(float));
    s->row2 = calloc(big, sizeof(float));
    s->key_cache = calloc(cache ? cache : 1, sizeof(float));
    s->value_cache = calloc(cache ? cache : 1, sizeof(float));
    s->logits = calloc((size_t)m->vocab_size, sizeof(float));
    if (!s->x || !s->h || !s->q || !s->y || !s->f || !s->hid || !s->att || !s->fw || !s->row || !s->row2 ||
        !s->key_cache || !s->value_cache || !s->logits) {
        crystal_state_free(s);
        return -1;
    }
    return 0;
}

void crystal_state_free(crystal_state *s) {
    free(s->x);
    free(s->h);
    free(s->q);
    free(s->y);
    free(s->f);
    free(s->hid);
    free(s->att);
    free(s->fw);
    free(s->row);
    free(s->row2);
    free(s->key_cache);
    free(s->value_cache);
    free(s->logits);
    memset(s, 0, sizeof *s);
}

int crystal_forward_sequence(const crystal_model *m, const int32_t *ids, int n, float *out) {
    if (n < 1 || n > m->n_ctx) return -1;
    for (int i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= m->vocab_size) return -1;
    crystal_state s;
    if (crystal_state_init(&s, m)) return -1;
    for (int i = 0; i < n; i++) {
        const float *logits = crystal_forward(m, &s, ids[i], i, 1);
        memcpy(out + (size_t)i * (size_t)m->vocab_size, logits, (size_t)m->vocab_size * sizeof(float));
    }
    crystal_state_free(&s);
    return 0;
}
