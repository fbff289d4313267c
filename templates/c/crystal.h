/* crystal.h: the in-memory model every piece of crystalc's C shares.
 *
 * The generated model (weights linked into the binary) and the portable
 * runtime (weights loaded from a .crystal file) both fill a crystal_model and
 * hand it to the same forward pass. One meaning of a quantized tensor, the
 * IR's: value = (float)code * scale + offset, in float32, no fused multiply-add.
 */
#ifndef CRYSTAL_H
#define CRYSTAL_H

#include <stddef.h>
#include <stdint.h>

enum crystal_dtype { CRYSTAL_F32 = 0, CRYSTAL_I8 = 1, CRYSTAL_I16 = 2 };
enum crystal_scheme { CRYSTAL_Q_NONE = 0, CRYSTAL_Q_TENSOR = 1, CRYSTAL_Q_ROW = 2, CRYSTAL_Q_GROUP = 3 };

/* A row-major matrix (a vector is one row of `cols` entries). */
typedef struct {
    const void *data;     /* float, int8_t or int16_t by dtype */
    int dtype;            /* enum crystal_dtype */
    int scheme;           /* enum crystal_scheme; CRYSTAL_Q_NONE for float32 */
    int rows, cols;
    int group;            /* columns sharing one scale under CRYSTAL_Q_GROUP */
    const float *scale;   /* 1 (tensor), rows (row), rows * ceil(cols / group) (group) */
    const float *offset;  /* as many as scale, or NULL for 0 (the symmetric row and group schemes) */
} crystal_tensor;

/* --- reading a code: the one definition every piece of crystalc's C uses --------------------
 * (crystal_forward.c, the CUDA forward pass's host side, the portable runtime's loader) */

/* Columns that share one scale: the group under CRYSTAL_Q_GROUP, else the whole row. */
static inline int crystal_segment_width(const crystal_tensor *t) {
    return t->scheme == CRYSTAL_Q_GROUP && t->group > 0 ? t->group : t->cols;
}

/* Where in t->scale (and t->offset) the scale of the code at row r, column c is: 0 (tensor),
 * r (row), or r * ceil(cols / group) + c / group (group). */
static inline size_t crystal_scale_index(const crystal_tensor *t, int r, int c) {
    if (t->scheme == CRYSTAL_Q_ROW) return (size_t)r;
    if (t->scheme == CRYSTAL_Q_GROUP) {
        int width = crystal_segment_width(t);
        return (size_t)r * (size_t)((t->cols + width - 1) / width) + (size_t)(c / width);
    }
    return 0;
}

/* A code's value under scale and offset, exactly crystalc.ir.tensor.dequantize: the product,
 * then the sum, two float32 roundings. Two statements, and every build of this C passes
 * -ffp-contract=off (the Makefiles, crystalc.runtime; the CUDA host code too): no compiler
 * fuses them into one fused multiply-add. */
static inline float crystal_dequant_code(float code, float scale, float offset) {
    float scaled = code * scale;
    return scaled + offset;
}

/* The float32 value at row r, column c of any tensor (float32, or codes under any scheme). */
static inline float crystal_dequant(const crystal_tensor *t, int r, int c) {
    size_t i = (size_t)r * (size_t)t->cols + (size_t)c;
    if (t->dtype == CRYSTAL_F32) return ((const float *)t->data)[i];
    float code = t->dtype == CRYSTAL_I8 ? (float)((const int8_t *)t->data)[i] : (float)((const int16_t *)t->data)[i];
    size_t q = crystal_scale_index(t, r, c);
    return crystal_dequant_code(code, t->scale[q], t->offset ? t->offset[q] : 0.0f);
}

typedef struct { crystal_tensor weight, bias; } crystal_layer_norm;

typedef struct {
    crystal_tensor q_weight, q_bias, k_weight, k_bias, v_weight, v_bias, out_weight, out_bias;
} crystal_causal_attention;

typedef struct {
    int n_neurons;
    crystal_tensor positions, values, temperature;  /* [N,D], [N,D], [N] */
    const uint8_t *frozen;                          /* [N], 1 = crystallised */
} crystal_neuron_field;

typedef struct { crystal_tensor fc1_weight, fc1_bias, fc2_weight, fc2_bias; } crystal_ffn;

typedef struct {
    crystal_layer_norm ln1;
    crystal_causal_attention attn;
    crystal_layer_norm ln2;
    crystal_neuron_field field;
    crystal_layer_norm ln3;
    crystal_ffn ffn;
} crystal_block;

enum crystal_tokenizer { CRYSTAL_TOK_NONE = 0, CRYSTAL_TOK_CHAR = 1, CRYSTAL_TOK_OTHER = 2, CRYSTAL_TOK_BPE = 3 };

typedef struct {
    int vocab_size;        /* current vocabulary (after pruning) */
    int d_model, n_ctx, n_heads, n_blocks, ffn_hidden;
    int field_norm, final_norm, tie_head;
    float field_eps, ln_eps;
    crystal_tensor token_embed, pos_embed;
    const crystal_block *blocks;      /* n_blocks */
    crystal_layer_norm ln_f;          /* when final_norm */
    crystal_tensor head_weight;       /* the token embedding when tie_head */
    crystal_tensor head_bias;
    int orig_vocab_size;              /* the tokenizer's vocabulary before pruning */
    const int32_t *vocab_map;         /* [vocab_size] original id of each row; NULL = identity */
    int tokenizer;                    /* enum crystal_tokenizer */
    const char *chars;                /* CRYSTAL_TOK_CHAR: UTF-8 text of each original id; BPE: its bytes; */
    const uint32_t *char_offsets;     /* id i is chars[char_offsets[i] .. char_offsets[i+1]) */
    /* CRYSTAL_TOK_BPE, a byte-level BPE lowered by crystalc (crystalc.tokenizer.byte_level_bpe): */
    const int32_t *bpe_byte_ids;      /* [256] the id of each single byte */
    int bpe_n_merges;
    const int32_t *bpe_merges;        /* [bpe_n_merges][4] left, right, rank, merged id; sorted by (left, right) */
    /* NULL, or an untied float32 head already laid out as crystal_forward.c packs it: tiles of
     * CRYSTAL_HEAD_TILE rows (V rounded up, zero rows past V), each stored transposed [D][tile]
     * (the C backend writes it so; head_weight.data is then NULL) */
    const float *head_tiles;
} crystal_model;

#define CRYSTAL_HEAD_TILE 128

/* --- crystal_forward.c: the forward pass over any filled crystal_model ------------------- */

/* Run state of one sequence: the KV cache, activations, and the weights packed for the
 * matrix products (transposed, dequantised, padded), all owned by crystal_forward.c. */
struct crystal_work;

typedef struct {
    struct crystal_work *work;
    float *logits;       /* [V] */
} crystal_state;

int crystal_state_init(crystal_state *s, const crystal_model *m);  /* 0, or -1 when out of memory */
void crystal_state_free(crystal_state *s);
/* Feed current-vocabulary id `token` at position `pos` (0 <= pos < n_ctx), filling the KV
 * cache at `pos` (positions < pos must already be there); return the logits [V], or NULL
 * when want_logits is 0 (the head is skipped). */
const float *crystal_forward(const crystal_model *m, crystal_state *s, int token, int pos, int want_logits);
/* Feed current-vocabulary ids[0..n) at positions start..start+n-1 (start + n <= n_ctx) in one
 * go (a prompt, or the window recomputed after a shift), filling the KV cache; return the
 * logits [V] of the last of them, or NULL when want_logits is 0. */
const float *crystal_forward_window(const crystal_model *m, crystal_state *s, const int32_t *ids, int start, int n,
                                    int want_logits);
/* Threads for the products (a program built with OpenMP); 0, or -1 when n > 1 and it was
 * built without. Results are the same bits whatever the count. */
int crystal_set_threads(int n);
/* Logits [n, V] of every position of `ids` (1 <= n <= n_ctx) into `out`; 0, or -1 on bad input. */
int crystal_forward_sequence(const crystal_model *m, const int32_t *ids, int n, float *out);

/* --- crystal_cli.c: the spec's command line shared by every generated program -------------- */

/* argv[0] names the program in messages; the options follow (no model path). Returns the
 * exit status: 0, or 2 after one line on stderr for bad arguments. */
int crystal_main(const crystal_model *m, int argc, char **argv);

/* Called by crystal_main once the command line is checked, before the model's state is made, so that
 * --help and a bad option answer without a device: a target that needs one (CUDA) says here, in a
 * line, that it has none, and returns nonzero. NULL (the default): no device needed. */
extern int (*crystal_device_check)(const char *prog);

#endif
