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

static float dot_f32(const float *w, const float *x, int n) {
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += w[i] * x[i];
        a1 += w[i + 1] * x[i + 1];
        a2 += w[i + 2] * x[i + 2];
        a3 += w[i + 3] * x[i + 3];
        a4 += w[i + 4] * x[i + 4];
        a5 += w[i + 5] * x[i + 5];
        a6 += w[i + 6] * x[i + 6];
        a7 += w[i + 7] * x[i + 7];
    }
    float acc = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    for (; i < n; i++) acc += w[i] * x[i];
    return acc;
}

/* The same dot product over integer codes, each dequantised exactly as the IR does. */
#define DEFINE_DOT_INT(NAME, CODE)                                                 \
    static float NAME(const CODE *c, float s, float o, const float *x, int n) {    \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;      \
        int i = 0;                                                                 \
        for (; i + 8 <= n; i += 8) {                                               \
            a0 += ((float)c[i] * s + o) * x[i];                                    \
            a1 += ((float)c[i + 1] * s + o) * x[i + 1];                            \
            a2 += ((float)c[i + 2] * s + o) * x[i + 2];                            \
            a3 += ((float)c[i + 3] * s + o) * x[i + 3];                            \
            a4 += ((float)c[i + 4] * s + o) * x[i + 4];                            \
            a5 += ((float)c[i + 5] * s + o) * x[i + 5];                            \
            a6 += ((float)c[i + 6] * s + o) * x[i + 6];                            \
            a7 += ((float)c[i + 7] * s + o) * x[i + 7];                            \
        }                                                                          \
        float acc = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));             \
        for (; i < n; i++) acc += ((float)c[i] * s + o) * x[i];                    \
        return acc;                                                                \
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

/* Row r as float32 values; returns a pointer to them (the weights themselves when float32). */
static const float *row_values(const crystal_tensor *t, int r, float *out) {
    size_t base = (size_t)r * (size_t)t->cols;
    if (t->dtype == CRYSTAL_F32) return (const float *)t->data + base;
    int width = segment_width(t);
    int n_segments = (t->cols + width - 1) / width;
    for (int g = 0; g < n_segments; g++) {
        int c0 = g * width;
        int n = t->cols - c0 < width ? t->cols - c0 : width;
        float s, o;
        quant_params(t, r, g, n_segments, &s, &o);
        if (t->dtype == CRYSTAL_I8) {
            const int8_t *c = (const int8_t *)t->data + base + c0;
            for (int i = 0; i < n; i++) out[c0 + i] = (float)c[i] * s + o;
        } else {
            const int16_t *c = (const int16_t *)t->data + base + c0;
            for (int i = 0; i < n; i++) out[c0 + i] = (float)c[i] * s + o;
        }
    }
    return out;
}

/* out[rows] = W x + b; `scratch` holds the dequantised bias. */
static void linear(const crystal_tensor *w, const crystal_tensor *b, const float *x, float *out, float *scratch) {
    const float *bias = row_values(b, 0, scratch);
    for (int r = 0; r < w->rows; r++) out[r] = row_dot(w, r, x) + bias[r];
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
        for (int t = 0; t <= pos; t++) {
            const float *k = s->key_cache + layer_off + (size_t)t * d + head * hd;
            float score = dot_f32(q, k, hd) / scale;
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

/* neuron_field: s->f = sum_j w_j val_j, w_j = exp(-|h - pos_j| / (|tau_j| + 0.1)), optionally normalised */
static void neuron_field(const crystal_model *m, crystal_state *s, const crystal_neuron_field *nf) {
    int d = m->d_model, n = nf->n_neurons;
    for (int i = 0; i < d; i++) s->f[i] = 0.0f;
    if (n == 0) return;
    const float *tau = row_values(&nf->temperature, 0, s->row2);
    float total = 0.0f;
    for (int j = 0; j < n; j++) {
        const float *p = row_values(&nf->positions, j, s->row);
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
        int i = 0;
        for (; i + 4 <= d; i += 4) {
            float e0 = s->h[i] - p[i], e1 = s->h[i + 1] - p[i + 1];
            float e2 = s->h[i + 2] - p[i + 2], e3 = s->h[i + 3] - p[i + 3];
            a0 += e0 * e0;
            a1 += e1 * e1;
            a2 += e2 * e2;
            a3 += e3 * e3;
        }
        float sq = (a0 + a1) + (a2 + a3);
        for (; i < d; i++) sq += (s->h[i] - p[i]) * (s->h[i] - p[i]);
        s->fw[j] = expf(-sqrtf(sq) / (fabsf(tau[j]) + 0.1f));
        total += s->fw[j];
    }
    if (m->field_norm)
        for (int j = 0; j < n; j++) s->fw[j] = s->fw[j] / (total + m->field_eps);
    for (int j = 0; j < n; j++) {
        const float *v = row_values(&nf->values, j, s->row);
        float w = s->fw[j];
        for (int i = 0; i < d; i++) s->f[i] += w * v[i];
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
