/* crystal_runtime.c: the portable runtime. Its loader reads a .crystal file
 * (docs/crystal-format.md: crystalc's version 3, or the seeds' version 2),
 * checks every number in it before using it as a size or an offset, and fills
 * the crystal_model of crystal.h that the shared forward pass runs.
 *
 * Every size is computed in uint64_t with explicit overflow checks, and every
 * range is checked as `off <= limit && len <= limit - off`, which cannot wrap.
 * A malformed file gives one line in `err` and a nonzero return, never a crash:
 * the fuzz target in fuzz/ drives crystal_load_bytes() under ASan and UBSan.
 */
#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crystal.h"

/* What a loaded model owns: the file's bytes (tensors point into them) and the few
 * arrays the file cannot lend in place. */
typedef struct {
    uint8_t *buf;                 /* the whole file, when loaded from a path */
    uint8_t *arena;               /* version 2: aligned copies of the arrays */
    uint64_t arena_size, arena_used;
    crystal_block *blocks;
    uint32_t *char_offsets;       /* orig_vocab_size + 1 entries */
    void *entries, *spans;        /* the section table, only while loading */
} crystal_file;

#define MAGIC 0x53595243u
#define ALIGN 64u
#define HEADER_BYTES 64u
#define ENTRY_BYTES 96u
#define NAME_BYTES 48u
#define MAX_DIM (1u << 20)
#define MAX_ELEMENTS (1ull << 31)

/* flag bits; the first five keep the seeds' values */
#define F_PRUNED_VOCAB 0x0004u
#define F_FLOAT32 0x0008u
#define F_INT16 0x0010u
#define F_MIXED 0x0020u
#define F_MIXED8 0x0040u
#define F_CAUSAL 0x0080u
#define F_FIELD_NORM 0x0100u
#define F_FINAL_NORM 0x0200u
#define F_TIE_HEAD 0x0400u
#define F_KNOWN 0x07fcu
#define F_SUMMARY (F_FLOAT32 | F_INT16 | F_MIXED | F_MIXED8)

enum { DT_F32 = 0, DT_I8 = 1, DT_I16 = 2, DT_BOOL = 3, DT_U8 = 4, DT_I32 = 5, DT_COUNT = 6 };
static const unsigned dtype_size[DT_COUNT] = {4, 1, 2, 1, 1, 4};
static const char *const dtype_name[DT_COUNT] = {"f32", "i8", "i16", "bool", "u8", "i32"};

typedef struct {
    char name[NAME_BYTES];
    unsigned dtype, scheme, ndim, group;
    uint32_t dim0, dim1;
    uint64_t off, len, qoff, qlen;
    int used;
} entry;

typedef struct { uint64_t start, end; const char *name; } span;

static int fail(char *err, size_t errlen, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t rd64(const uint8_t *p) { return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32); }
static double rdf64(const uint8_t *p) {
    uint64_t u = rd64(p);
    double d;
    memcpy(&d, &u, sizeof d);
    return d;
}

static int mul_ok(uint64_t a, uint64_t b, uint64_t *out) {
    if (a != 0 && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

/* [off, off+len) inside [lo, hi) without any sum that could wrap */
static int range_ok(uint64_t off, uint64_t len, uint64_t lo, uint64_t hi) {
    return off >= lo && off <= hi && len <= hi - off;
}

uint32_t crystal_crc32(const uint8_t *p, size_t n) {
    static uint32_t table[256];
    static int ready = 0;
    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int k = 0; k < 8; k++) c = (c & 1) ? 0xedb88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        ready = 1;
    }
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) c = table[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

/* --- a bump arena for what the file cannot lend in place ---------------------------------- */

static void *arena_alloc(crystal_file *f, uint64_t bytes) {
    uint64_t at = (f->arena_used + 15u) & ~(uint64_t)15u;
    if (at > f->arena_size || bytes > f->arena_size - at) return NULL;
    f->arena_used = at + bytes;
    return f->arena + at;
}

/* --- version 3 ---------------------------------------------------------------------------- */

static int entry_cmp(const void *a, const void *b) {
    return strcmp(((const entry *)a)->name, ((const entry *)b)->name);
}

static int key_cmp(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* by start, then end, then name: qsort need not be stable, and an overlap is named as Python names it */
static int span_cmp(const void *a, const void *b) {
    const span *x = a, *y = b;
    if (x->start != y->start) return (x->start > y->start) - (x->start < y->start);
    if (x->end != y->end) return (x->end > y->end) - (x->end < y->end);
    return strcmp(x->name, y->name);
}

static entry *find(entry *es, size_t n, const char *name) {
    entry key;
    snprintf(key.name, sizeof key.name, "%s", name);
    return bsearch(&key, es, n, sizeof *es, entry_cmp);
}

static int all_finite(const float *v, uint64_t n) {
    for (uint64_t i = 0; i < n; i++)
        if (!isfinite(v[i])) return 0;
    return 1;
}

/* Whether every code of a quantized tensor dequantizes to a finite value (crystal.h's crystal_dequant,
 * the forward pass's own reading): finite scales and offsets can still overflow float32 (a scale of
 * 3e38 times a code of 127). */
static int codes_finite(const crystal_tensor *t) {
    for (int r = 0; r < t->rows; r++)
        for (int c = 0; c < t->cols; c++)
            if (!isfinite(crystal_dequant(t, r, c))) return 0;
    return 1;
}

static uint64_t n_scales(const entry *e) {
    uint64_t rows = e->ndim == 2 ? e->dim0 : 1;
    if (e->scheme == CRYSTAL_Q_TENSOR) return 1;
    if (e->scheme == CRYSTAL_Q_ROW) return rows;
    return rows * (((uint64_t)e->dim1 + e->group - 1) / e->group);
}

typedef struct {
    const uint8_t *buf;
    entry *es;
    size_t n;
    unsigned dtypes_seen_emb, dtypes_seen_rest; /* bit masks of dtype codes, for the mode flags */
    char *err;
    size_t errlen;
} ctx;

/* Fill `t` from the section `name`, a weight tensor of shape [rows, cols] (ndim 2) or
 * [cols] (ndim 1, one row). */
static int weight(ctx *c, const char *name, unsigned ndim, uint32_t rows, uint32_t cols, int emb, crystal_tensor *t) {
    entry *e = find(c->es, c->n, name);
    if (!e) return fail(c->err, c->errlen, "missing section %s", name);
    e->used = 1;
    if (e->dtype != DT_F32 && e->dtype != DT_I8 && e->dtype != DT_I16)
        return fail(c->err, c->errlen, "%s: dtype %s, expected f32, i8 or i16", name, dtype_name[e->dtype]);
    if (ndim == 1) rows = 1;
    if (e->ndim != ndim || (ndim == 2 && (e->dim0 != rows || e->dim1 != cols)) || (ndim == 1 && e->dim0 != cols)) {
        if (ndim == 2)
            return fail(c->err, c->errlen, "%s: shape [%u, %u] (ndim %u), expected [%u, %u]", name, e->dim0, e->dim1,
                        e->ndim, rows, cols);
        return fail(c->err, c->errlen, "%s: shape [%u, %u] (ndim %u), expected [%u]", name, e->dim0, e->dim1,
                    e->ndim, cols);
    }
    if (emb) c->dtypes_seen_emb |= 1u << e->dtype;
    else c->dtypes_seen_rest |= 1u << e->dtype;
    memset(t, 0, sizeof *t);
    t->data = c->buf + e->off;
    t->dtype = (int)e->dtype;
    t->scheme = (int)e->scheme;
    t->rows = (int)rows;
    t->cols = (int)cols;
    t->group = (int)(e->group > cols ? cols : e->group);  /* a group wider than the row is the row; fits an int */
    if (e->dtype == DT_F32 && !all_finite((const float *)t->data, e->len / 4))
        return fail(c->err, c->errlen, "%s: NaN or Inf values", name);
    if (e->scheme != CRYSTAL_Q_NONE) {
        /* tensor: scales then offsets; row and group: scales only, offset 0 (NULL to the forward pass) */
        int sym = e->scheme != CRYSTAL_Q_TENSOR;
        uint64_t ns = n_scales(e);
        t->scale = (const float *)(c->buf + e->qoff);
        t->offset = sym ? NULL : t->scale + ns;
        if (!all_finite(t->scale, sym ? ns : 2 * ns))
            return fail(c->err, c->errlen, "%s: quantization scale or offset holds NaN or Inf", name);
        if (!codes_finite(t))
            return fail(c->err, c->errlen, "%s: a code times its scale, plus its offset, overflows float32", name);
    }
    return 0;
}

static int load_layer_norm(ctx *c, const char *prefix, uint32_t d, crystal_layer_norm *ln) {
    char name[NAME_BYTES + 16];
    snprintf(name, sizeof name, "%s.weight", prefix);
    if (weight(c, name, 1, 1, d, 0, &ln->weight)) return -1;
    snprintf(name, sizeof name, "%s.bias", prefix);
    return weight(c, name, 1, 1, d, 0, &ln->bias);
}

static int utf8_next(const uint8_t *s, uint64_t n, uint64_t i, uint64_t *len) {
    uint8_t b = s[i];
    uint64_t k;
    uint8_t lo = 0x80, hi = 0xbf;
    if (b < 0x80) { *len = 1; return 1; }
    if (b >= 0xc2 && b <= 0xdf) k = 1;
    else if (b >= 0xe0 && b <= 0xef) { k = 2; if (b == 0xe0) lo = 0xa0; if (b == 0xed) hi = 0x9f; }
    else if (b >= 0xf0 && b <= 0xf4) { k = 3; if (b == 0xf0) lo = 0x90; if (b == 0xf4) hi = 0x8f; }
    else return 0;
    if (k > n - i - 1) return 0;
    for (uint64_t j = 1; j <= k; j++) {
        uint8_t x = s[i + j];
        if (x < (j == 1 ? lo : 0x80) || x > (j == 1 ? hi : 0xbf)) return 0;
    }
    *len = k + 1;
    return 1;
}

/* JSON syntax (RFC 8259), for the sections only Python reads: a file its reader refuses is refused here
 * too. Both refuse what crystalc's writer cannot write: nesting past JSON_DEPTH arrays and objects, a
 * number longer than JSON_NUMBER bytes or past double's range, a \u escape of half a surrogate pair
 * (NaN and Infinity, Python's extensions, are not JSON). */
#define JSON_DEPTH 64
#define JSON_NUMBER 100

static uint64_t json_space(const uint8_t *s, uint64_t n, uint64_t i) {
    while (i < n && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    return i;
}

static int json_digits(const uint8_t *s, uint64_t n, uint64_t *i) {
    uint64_t k = *i;
    while (*i < n && s[*i] >= '0' && s[*i] <= '9') (*i)++;
    return *i > k;
}

/* the value of the four hex digits at s[i], or -1 */
static long json_hex4(const uint8_t *s, uint64_t n, uint64_t i) {
    long v = 0;
    if (i > n || n - i < 4) return -1;
    for (uint64_t j = i; j < i + 4; j++) {
        uint8_t c = s[j];
        if (c >= '0' && c <= '9') v = v * 16 + (c - '0');
        else if ((c | 0x20) >= 'a' && (c | 0x20) <= 'f') v = v * 16 + ((c | 0x20) - 'a' + 10);
        else return -1;
    }
    return v;
}

static int json_string(const uint8_t *s, uint64_t n, uint64_t *i) {  /* s[*i] is the opening quote */
    for (uint64_t k = *i + 1; k < n; k++) {
        if (s[k] == '"') { *i = k + 1; return 1; }
        if (s[k] < 0x20) return 0;              /* control characters only as escapes */
        if (s[k] != '\\') continue;
        if (++k >= n) return 0;
        if (s[k] == 'u') {
            long u = json_hex4(s, n, k + 1);
            k += 4;                                          /* at the escape's last digit */
            if (u < 0 || (u >= 0xdc00 && u <= 0xdfff)) return 0;  /* not hex; a low half alone */
            if (u >= 0xd800 && u <= 0xdbff) {                /* a high half: its low half must follow */
                if (k + 2 >= n || s[k + 1] != '\\' || s[k + 2] != 'u') return 0;
                long lo = json_hex4(s, n, k + 3);
                if (lo < 0xdc00 || lo > 0xdfff) return 0;
                k += 6;
            }
        } else if (!memchr("\"\\/bfnrt", s[k], 8)) {
            return 0;
        }
    }
    return 0;
}

static int json_value(const uint8_t *s, uint64_t n, uint64_t *i, int depth) {
    uint64_t k = json_space(s, n, *i);
    if (k >= n) return 0;
    if (s[k] == '{' || s[k] == '[') {
        uint8_t close = s[k] == '{' ? '}' : ']';
        if (depth >= JSON_DEPTH) return 0;
        k = json_space(s, n, k + 1);
        if (k < n && s[k] == close) { *i = k + 1; return 1; }
        for (;;) {
            if (close == '}') {                 /* a member: "key" : value */
                if (k >= n || s[k] != '"' || !json_string(s, n, &k)) return 0;
                k = json_space(s, n, k);
                if (k >= n || s[k++] != ':') return 0;
            }
            if (!json_value(s, n, &k, depth + 1)) return 0;
            k = json_space(s, n, k);
            if (k < n && s[k] == close) { *i = k + 1; return 1; }
            if (k >= n || s[k] != ',') return 0;
            k = json_space(s, n, k + 1);
        }
    }
    if (s[k] == '"') { *i = k; return json_string(s, n, i); }
    static const char *const words[] = {"true", "false", "null"};
    for (int w = 0; w < 3; w++) {
        size_t len = strlen(words[w]);
        if (n - k >= len && !memcmp(s + k, words[w], len)) { *i = k + len; return 1; }
    }
    uint64_t j = k + (s[k] == '-');             /* -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)? */
    int fraction = 0;
    if (j < n && s[j] == '0') j++;
    else if (!(j < n && s[j] >= '1' && s[j] <= '9' && json_digits(s, n, &j))) return 0;
    if (j < n && s[j] == '.') {
        j++;
        fraction = 1;
        if (!json_digits(s, n, &j)) return 0;
    }
    if (j < n && (s[j] == 'e' || s[j] == 'E')) {
        j += 1 + (j + 1 < n && (s[j + 1] == '+' || s[j + 1] == '-'));
        fraction = 1;
        if (!json_digits(s, n, &j)) return 0;
    }
    if (j - k > JSON_NUMBER) return 0;
    if (fraction) {                             /* read as a double, as Python does: 1e400 overflows */
        char text[JSON_NUMBER + 1];
        memcpy(text, s + k, j - k);
        text[j - k] = 0;
        if (isinf(strtod(text, NULL))) return 0;
    }
    *i = j;
    return 1;
}

/* one JSON object, whitespace around it */
static int json_object(const uint8_t *s, uint64_t n) {
    uint64_t i = json_space(s, n, 0);
    return i < n && s[i] == '{' && json_value(s, n, &i, 0) && json_space(s, n, i) == n;
}

/* A byte-level BPE's tables (crystalc.format.crystal's tokenizer.bpe sections, derived from tokenizer.json),
 * checked as crystal_cli.c's encoder and printer read them: every id within the original vocabulary, the
 * token texts' offsets running from 0 to the end of their bytes, the merges sorted by pair for its binary
 * search, their ranks within their count. */
static int load_bpe(entry *es, uint32_t n_sections, crystal_model *m, const uint8_t *buf, uint32_t orig,
                    int have_json, char *err, size_t errlen) {
    static const char *const names[4] = {"tokenizer.bpe.bytes", "tokenizer.bpe.offsets", "tokenizer.bpe.byte_ids",
                                         "tokenizer.bpe.merges"};
    entry *e[4];
    int n = 0;
    for (int i = 0; i < 4; i++)
        if ((e[i] = find(es, n_sections, names[i])) != NULL) e[i]->used = 1, n++;
    if (n == 0) return 0;
    if (n != 4 || !have_json)
        return fail(err, errlen, "the four tokenizer.bpe sections come together, beside a tokenizer.json section");
    if (e[0]->dtype != DT_U8 || e[0]->ndim != 1)
        return fail(err, errlen, "tokenizer.bpe.bytes: expected a 1-D u8 array");
    if (e[1]->dtype != DT_I32 || e[1]->ndim != 1 || e[1]->dim0 != (uint64_t)orig + 1)
        return fail(err, errlen, "tokenizer.bpe.offsets: expected an i32 [%llu] section", (unsigned long long)orig + 1);
    if (e[2]->dtype != DT_I32 || e[2]->ndim != 1 || e[2]->dim0 != 256)
        return fail(err, errlen, "tokenizer.bpe.byte_ids: expected an i32 [256] section");
    if (e[3]->dtype != DT_I32 || e[3]->ndim != 2 || e[3]->dim1 != 4 || e[3]->dim0 > INT32_MAX)
        return fail(err, errlen, "tokenizer.bpe.merges: expected an i32 [M, 4] section");
    const int32_t *offs = (const int32_t *)(buf + e[1]->off);
    if (offs[0] != 0 || offs[orig] < 0 || (uint64_t)offs[orig] != e[0]->len)
        return fail(err, errlen, "tokenizer.bpe.offsets: must run from 0 to the %llu bytes of tokenizer.bpe.bytes",
                    (unsigned long long)e[0]->len);
    for (uint32_t k = 0; k < orig; k++)
        if (offs[k + 1] < offs[k]) return fail(err, errlen, "tokenizer.bpe.offsets: must not decrease");
    const int32_t *ids = (const int32_t *)(buf + e[2]->off);
    for (int b = 0; b < 256; b++)
        if (ids[b] < 0 || (uint32_t)ids[b] >= orig)
            return fail(err, errlen, "tokenizer.bpe.byte_ids: an id outside the original vocabulary");
    const int32_t *merges = (const int32_t *)(buf + e[3]->off);
    uint32_t n_merges = e[3]->dim0;
    for (uint32_t i = 0; i < n_merges; i++) {
        const int32_t *r = merges + 4 * (size_t)i;
        for (int j = 0; j < 4; j++)
            if (r[j] < 0 || (uint32_t)r[j] >= (j == 2 ? n_merges : orig))
                return fail(err, errlen, "tokenizer.bpe.merges: row %u holds an id or rank out of range", i);
        if (i && (r[0] < r[-4] || (r[0] == r[-4] && r[1] <= r[-3])))  /* against the row before */
            return fail(err, errlen, "tokenizer.bpe.merges: pairs not strictly increasing at row %u", i);
    }
    m->tokenizer = CRYSTAL_TOK_BPE;
    m->chars = (const char *)(buf + e[0]->off);
    m->char_offsets = (const uint32_t *)offs;  /* non-negative, checked above */
    m->bpe_byte_ids = ids;
    m->bpe_n_merges = (int)n_merges;
    m->bpe_merges = merges;
    return 0;
}

static int load_v3(crystal_file *f, crystal_model *m, const uint8_t *buf, size_t size, char *err, size_t errlen) {
    if (size < HEADER_BYTES + 4)
        return fail(err, errlen, "file is %zu bytes, too short for a .crystal header and checksum", size);
    uint32_t flags = rd16(buf + 6);
    uint32_t vocab = rd32(buf + 8), orig = rd32(buf + 12), d = rd32(buf + 16), t = rd32(buf + 20);
    uint32_t h = rd32(buf + 24), nb = rd32(buf + 28), ffn = rd32(buf + 32), n_sections = rd32(buf + 36);
    uint64_t table = rd64(buf + 40);
    double ln_eps = rdf64(buf + 48), field_eps = rdf64(buf + 56);
    const struct { const char *what; uint32_t v; } dims[] = {
        {"vocab_size", vocab}, {"d_model", d}, {"n_ctx", t}, {"n_heads", h},
        {"n_blocks", nb}, {"ffn_hidden", ffn}, {"orig_vocab_size", orig}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v < 1 || dims[i].v > MAX_DIM)
            return fail(err, errlen, "header: %s = %u is outside 1..%u", dims[i].what, dims[i].v, MAX_DIM);
    if (d % h) return fail(err, errlen, "header: d_model %u is not divisible by n_heads %u", d, h);
    if (orig < vocab)
        return fail(err, errlen, "header: orig_vocab_size %u is smaller than vocab_size %u", orig, vocab);
    /* the forward pass computes with them as float32: beyond FLT_MAX the conversion is undefined */
    if (!(ln_eps >= 0 && ln_eps <= FLT_MAX) || !(field_eps >= 0 && field_eps <= FLT_MAX))
        return fail(err, errlen, "header: ln_eps or field_eps is not a non-negative number within float32's range");
    if (flags & ~F_KNOWN) return fail(err, errlen, "header: unknown flag bits 0x%04x", flags & ~F_KNOWN);
    if (!(flags & F_CAUSAL)) return fail(err, errlen, "header: the CAUSAL flag is missing");
    if (!(flags & F_PRUNED_VOCAB) && orig != vocab)
        return fail(err, errlen, "header: orig_vocab_size %u differs from vocab_size %u without PRUNED_VOCAB",
                    orig, vocab);
    if (table % ALIGN || table < HEADER_BYTES)
        return fail(err, errlen, "header: section table offset %llu is not a multiple of 64 at or after byte 64",
                    (unsigned long long)table);
    uint64_t tbytes, end;
    if (!mul_ok(n_sections, ENTRY_BYTES, &tbytes) || table > UINT64_MAX - tbytes - 4 ||
        (end = table + tbytes + 4) > size)
        return fail(err, errlen, "file is truncated: %zu bytes, the section table and checksum need more", size);
    if (end < size) return fail(err, errlen, "%llu unexpected bytes after the checksum", (unsigned long long)(size - end));
    uint32_t stored = rd32(buf + size - 4), actual = crystal_crc32(buf, size - 4);
    if (stored != actual)
        return fail(err, errlen, "checksum mismatch (stored 0x%08x, contents give 0x%08x): the file is corrupted",
                    stored, actual);

    /* the table: bounded by the file size, so these allocations are too */
    entry *es = calloc(n_sections ? n_sections : 1, sizeof *es);
    span *spans = calloc(2 * (size_t)n_sections + 1, sizeof *spans);
    f->entries = es;
    f->spans = spans;
    if (!es || !spans) return fail(err, errlen, "out of memory reading a section table of %u entries", n_sections);
    for (uint32_t i = 0; i < n_sections; i++) {
        const uint8_t *p = buf + table + (uint64_t)i * ENTRY_BYTES;
        entry *e = &es[i];
        size_t len = 0;
        while (len < NAME_BYTES && p[len]) len++;
        if (len == 0 || len == NAME_BYTES)
            return fail(err, errlen, "section table entry %u: name is empty or not NUL-terminated", i);
        for (size_t k = 0; k < NAME_BYTES; k++) {
            uint8_t ch = p[k];
            int ok = k < len ? ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                                ch == '_' || ch == '.')
                             : ch == 0;
            if (!ok) return fail(err, errlen, "section table entry %u: bad name", i);
        }
        memcpy(e->name, p, len);
        e->dtype = p[48];
        e->scheme = p[49];
        e->ndim = p[50];
        e->group = rd32(p + 52);
        e->dim0 = rd32(p + 56);
        e->dim1 = rd32(p + 60);
        e->off = rd64(p + 64);
        e->len = rd64(p + 72);
        e->qoff = rd64(p + 80);
        e->qlen = rd64(p + 88);
        if (e->dtype >= DT_COUNT) return fail(err, errlen, "section %s: unknown dtype code %u", e->name, e->dtype);
        if ((e->ndim != 1 && e->ndim != 2) || (e->ndim == 1 && e->dim1 != 0) || p[51])
            return fail(err, errlen, "section %s: bad shape header (ndim %u, dims %u, %u)", e->name, e->ndim,
                        e->dim0, e->dim1);
        uint64_t count = e->dim0, bytes;
        if ((e->ndim == 2 && !mul_ok(count, e->dim1, &count)) || !mul_ok(count, dtype_size[e->dtype], &bytes) ||
            bytes != e->len)
            return fail(err, errlen, "section %s: %llu bytes do not hold a %s tensor of shape [%u%s%.0u]", e->name,
                        (unsigned long long)e->len, dtype_name[e->dtype], e->dim0, e->ndim == 2 ? ", " : "",
                        e->ndim == 2 ? e->dim1 : 0u);
        if (e->off % ALIGN || !range_ok(e->off, e->len, HEADER_BYTES, table))
            return fail(err, errlen, "section %s: data is not 64-aligned between the header and the section table",
                        e->name);
        if (e->scheme == CRYSTAL_Q_NONE) {
            if (e->group || e->qoff || e->qlen)
                return fail(err, errlen, "section %s: quantization parameters without a quantization scheme", e->name);
            if (e->dtype == DT_I8 || e->dtype == DT_I16)
                return fail(err, errlen, "section %s: an integer tensor needs a quantization scheme", e->name);
        } else {
            if ((e->dtype != DT_I8 && e->dtype != DT_I16) || e->scheme > CRYSTAL_Q_GROUP)
                return fail(err, errlen, "section %s: quantization scheme code %u on a %s tensor", e->name, e->scheme,
                            dtype_name[e->dtype]);
            int grp = e->scheme == CRYSTAL_Q_GROUP;
            if (grp != (e->group > 0) || (grp && e->ndim != 2))
                return fail(err, errlen, "section %s: group size %u does not fit the scheme", e->name, e->group);
            /* n_scales <= dim0 * dim1 <= the file size (checked above), so this cannot wrap */
            uint64_t want = (e->scheme == CRYSTAL_Q_TENSOR ? 8 : 4) * n_scales(e);
            if (e->qlen != want)
                return fail(err, errlen, "section %s: %llu bytes of quantization parameters, expected %llu", e->name,
                            (unsigned long long)e->qlen, (unsigned long long)want);
            if (e->qoff % ALIGN || !range_ok(e->qoff, e->qlen, HEADER_BYTES, table))
                return fail(err, errlen, "section %s: quantization parameters lie outside the data area", e->name);
        }
    }
    qsort(es, n_sections, sizeof *es, entry_cmp);
    for (uint32_t i = 1; i < n_sections; i++)
        if (!strcmp(es[i - 1].name, es[i].name)) return fail(err, errlen, "section %s appears twice", es[i].name);
    size_t n_spans = 0;
    for (uint32_t i = 0; i < n_sections; i++) {
        if (es[i].len) spans[n_spans++] = (span){es[i].off, es[i].off + es[i].len, es[i].name};
        if (es[i].qlen) spans[n_spans++] = (span){es[i].qoff, es[i].qoff + es[i].qlen, es[i].name};
    }
    qsort(spans, n_spans, sizeof *spans, span_cmp);
    for (size_t i = 1; i < n_spans; i++)
        if (spans[i].start < spans[i - 1].end)
            return fail(err, errlen, "sections %s and %s overlap", spans[i - 1].name, spans[i].name);

    /* the config: per-block neuron counts come from the field sections */
    if ((uint64_t)vocab * d > MAX_ELEMENTS || (uint64_t)t * d > MAX_ELEMENTS || (uint64_t)ffn * d > MAX_ELEMENTS ||
        (uint64_t)d * d > MAX_ELEMENTS)
        return fail(err, errlen, "header: a tensor of these dimensions would hold more than 2^31 elements");
    if ((uint64_t)nb > n_sections)
        return fail(err, errlen, "header: %u blocks but only %u sections", nb, n_sections);
    crystal_block *blocks = calloc(nb, sizeof *blocks);
    f->blocks = blocks;
    if (!blocks) return fail(err, errlen, "out of memory for %u blocks", nb);
    ctx c = {buf, es, n_sections, 0, 0, err, errlen};
    memset(m, 0, sizeof *m);
    m->vocab_size = (int)vocab;
    m->d_model = (int)d;
    m->n_ctx = (int)t;
    m->n_heads = (int)h;
    m->n_blocks = (int)nb;
    m->ffn_hidden = (int)ffn;
    m->field_norm = !!(flags & F_FIELD_NORM);
    m->final_norm = !!(flags & F_FINAL_NORM);
    m->tie_head = !!(flags & F_TIE_HEAD);
    m->field_eps = (float)field_eps;
    m->ln_eps = (float)ln_eps;
    m->orig_vocab_size = (int)orig;
    m->blocks = blocks;
    if (weight(&c, "token_embed.weight", 2, vocab, d, 1, &m->token_embed)) return -1;
    if (weight(&c, "pos_embed.weight", 2, t, d, 1, &m->pos_embed)) return -1;
    char name[NAME_BYTES + 32];
    for (uint32_t b = 0; b < nb; b++) {
        crystal_block *blk = &blocks[b];
        snprintf(name, sizeof name, "blocks.%u.field.positions", b);
        entry *pe = find(es, n_sections, name);
        if (!pe) return fail(err, errlen, "missing section %s", name);
        uint32_t n = pe->dim0;
        if (n > MAX_DIM) return fail(err, errlen, "%s: %u neurons, more than %u", name, n, MAX_DIM);
        if ((uint64_t)n * d > MAX_ELEMENTS)
            return fail(err, errlen, "%s: %u neurons of %u values would hold more than 2^31 elements", name, n, d);
        blk->field.n_neurons = (int)n;
#define W(field_, suffix, ndim, rows, cols)                                    \
        snprintf(name, sizeof name, "blocks.%u.%s", b, suffix);               \
        if (weight(&c, name, ndim, rows, cols, 0, &blk->field_)) return -1;
#define LN(field_, suffix)                                                     \
        snprintf(name, sizeof name, "blocks.%u.%s", b, suffix);               \
        if (load_layer_norm(&c, name, d, &blk->field_)) return -1;
        LN(ln1, "ln1")
        W(attn.q_weight, "attn.q_proj.weight", 2, d, d)
        W(attn.q_bias, "attn.q_proj.bias", 1, 1, d)
        W(attn.k_weight, "attn.k_proj.weight", 2, d, d)
        W(attn.k_bias, "attn.k_proj.bias", 1, 1, d)
        W(attn.v_weight, "attn.v_proj.weight", 2, d, d)
        W(attn.v_bias, "attn.v_proj.bias", 1, 1, d)
        W(attn.out_weight, "attn.out_proj.weight", 2, d, d)
        W(attn.out_bias, "attn.out_proj.bias", 1, 1, d)
        LN(ln2, "ln2")
        W(field.positions, "field.positions", 2, n, d)
        W(field.values, "field.values", 2, n, d)
        W(field.temperature, "field.temperature", 1, 1, n)
        snprintf(name, sizeof name, "blocks.%u.field.frozen", b);
        entry *fe = find(es, n_sections, name);
        if (!fe) return fail(err, errlen, "missing section %s", name);
        if (fe->dtype != DT_BOOL || fe->ndim != 1 || fe->dim0 != n)
            return fail(err, errlen, "%s: expected a bool [%u] section", name, n);
        fe->used = 1;
        blk->field.frozen = buf + fe->off;
        for (uint32_t j = 0; j < n; j++)
            if (blk->field.frozen[j] > 1) return fail(err, errlen, "%s: values other than 0 and 1", name);
        LN(ln3, "ln3")
        W(ffn.fc1_weight, "ffn.fc1.weight", 2, ffn, d)
        W(ffn.fc1_bias, "ffn.fc1.bias", 1, 1, ffn)
        W(ffn.fc2_weight, "ffn.fc2.weight", 2, d, ffn)
        W(ffn.fc2_bias, "ffn.fc2.bias", 1, 1, d)
#undef W
#undef LN
    }
    if (m->final_norm && load_layer_norm(&c, "ln_f", d, &m->ln_f)) return -1;
    if (m->tie_head) m->head_weight = m->token_embed;
    else if (weight(&c, "head.weight", 2, vocab, d, 0, &m->head_weight)) return -1;
    if (weight(&c, "head.bias", 1, 1, vocab, 0, &m->head_bias)) return -1;

    /* the seeds' mode bits must agree with the dtypes found */
    unsigned emb = c.dtypes_seen_emb, rest = c.dtypes_seen_rest, every = emb | rest, mode = 0;
    const unsigned F = 1u << DT_F32, I8 = 1u << DT_I8, I16 = 1u << DT_I16;
    if (every == F) mode = F_FLOAT32;
    else if (every == I16) mode = F_INT16;
    else if (emb == F && rest == I16) mode = F_MIXED;
    else if (emb == F && rest == I8) mode = F_MIXED8;
    if (mode != (flags & F_SUMMARY))
        return fail(err, errlen, "header: mode flags 0x%04x disagree with the sections' dtypes", flags & F_SUMMARY);

    entry *vm = find(es, n_sections, "vocab_map");
    if (!!vm != !!(flags & F_PRUNED_VOCAB))
        return fail(err, errlen, "the PRUNED_VOCAB flag and the presence of a vocab_map section disagree");
    if (vm) {
        vm->used = 1;
        if (vm->dtype != DT_I32 || vm->ndim != 1 || vm->dim0 != vocab)
            return fail(err, errlen, "vocab_map: expected an i32 [%u] section", vocab);
        const int32_t *map = (const int32_t *)(buf + vm->off);
        for (uint32_t i = 0; i < vocab; i++)
            if (map[i] < 0 || (uint32_t)map[i] >= orig || (i && map[i] <= map[i - 1]))
                return fail(err, errlen, "vocab_map: ids must be strictly increasing within the original vocabulary");
        m->vocab_map = map;
    }
    entry *tc = find(es, n_sections, "tokenizer.chars"), *tj = find(es, n_sections, "tokenizer.json");
    entry *mj = find(es, n_sections, "meta.json");
    if (tc && tj) return fail(err, errlen, "both tokenizer.chars and tokenizer.json sections are present");
    entry *bytes_sections[3] = {tc, tj, mj};
    for (int i = 0; i < 3; i++)
        if (bytes_sections[i]) {
            bytes_sections[i]->used = 1;
            if (bytes_sections[i]->dtype != DT_U8 || bytes_sections[i]->ndim != 1)
                return fail(err, errlen, "section %s: expected a 1-D u8 array", bytes_sections[i]->name);
        }
    /* the JSON sections are for Python; the runtime checks their form, not what they say */
    for (int i = 1; i < 3; i++) {
        const entry *e = bytes_sections[i];
        uint64_t len;
        for (uint64_t k = 0; e && k < e->len; k += len)
            if (!utf8_next(buf + e->off, e->len, k, &len))
                return fail(err, errlen, "section %s: not valid UTF-8", e->name);
        if (e && !json_object(buf + e->off, e->len))
            return fail(err, errlen, "section %s: not a JSON object", e->name);
    }
    m->tokenizer = tj ? CRYSTAL_TOK_OTHER : CRYSTAL_TOK_NONE;
    if (tc) {
        /* id i is the i-th UTF-8 character, one for every original id */
        const uint8_t *s = buf + tc->off;
        uint32_t *offs = calloc((size_t)orig + 1, sizeof *offs);
        f->char_offsets = offs;
        if (!offs) return fail(err, errlen, "out of memory for the tokenizer");
        uint64_t i = 0, id = 0, len;
        if (tc->len > UINT32_MAX) return fail(err, errlen, "tokenizer.chars: more than 4 GiB of text");
        while (i < tc->len) {
            if (!utf8_next(s, tc->len, i, &len)) return fail(err, errlen, "tokenizer.chars: not valid UTF-8");
            if (id <= orig) offs[id] = (uint32_t)i;
            id++;
            i += len;
        }
        if (id != orig)
            return fail(err, errlen, "tokenizer: %llu characters for a vocabulary of %u ids", (unsigned long long)id,
                        (unsigned)orig);
        offs[orig] = (uint32_t)tc->len;
        /* two ids of one character would make a prompt's encoding a guess (Python's reader refuses it too);
         * valid UTF-8 has one spelling a character, so its bytes, packed, are a key */
        uint32_t *keys = malloc(((size_t)orig ? orig : 1) * sizeof *keys);
        if (!keys) return fail(err, errlen, "out of memory for the tokenizer");
        for (uint32_t k = 0; k < orig; k++) {
            keys[k] = 0;
            for (uint32_t j = offs[k]; j < offs[k + 1]; j++) keys[k] = keys[k] << 8 | s[j];
        }
        qsort(keys, orig, sizeof *keys, key_cmp);
        int repeated = 0;
        for (uint32_t k = 1; k < orig; k++) repeated |= keys[k] == keys[k - 1];
        free(keys);
        if (repeated) return fail(err, errlen, "tokenizer.chars: a character appears twice");
        m->tokenizer = CRYSTAL_TOK_CHAR;
        m->chars = (const char *)s;
        m->char_offsets = offs;
    }
    if (load_bpe(es, n_sections, m, buf, orig, tj != NULL, err, errlen)) return -1;
    for (uint32_t i = 0; i < n_sections; i++)
        if (!es[i].used) return fail(err, errlen, "unknown section %s", es[i].name);
    return 0;
}

/* --- version 2: the seeds' files ---------------------------------------------------------- */

static int load_v2(crystal_file *f, crystal_model *m, const uint8_t *buf, size_t size, char *err, size_t errlen) {
    if (size < HEADER_BYTES)
        return fail(err, errlen, "file is %zu bytes, too short for a version-2 .crystal header", size);
    uint32_t flags = rd16(buf + 6), v = rd32(buf + 8);
    uint32_t d = rd16(buf + 12), t = rd16(buf + 14), hid = rd16(buf + 16), n = rd16(buf + 18);
    uint32_t n_frozen = rd16(buf + 20), n_active = rd16(buf + 22), h = rd16(buf + 24), n_norms = rd16(buf + 26);
    uint64_t off[8];
    for (int i = 0; i < 8; i++) off[i] = rd32(buf + 32 + 4 * i);
    const uint32_t known = F_PRUNED_VOCAB | F_FLOAT32 | F_MIXED8 | F_CAUSAL;
    if (flags & ~known) return fail(err, errlen, "version-2 header: unsupported flag bits 0x%04x", flags & ~known);
    if (!(flags & F_CAUSAL)) return fail(err, errlen, "version-2 header: not a causal model (the CAUSAL flag is missing)");
    int mixed8 = !!(flags & F_MIXED8);
    if (!!(flags & F_FLOAT32) == mixed8)
        return fail(err, errlen, "version-2 header: exactly one of FLOAT32 and MIXED8 must be set");
    const struct { const char *what; uint32_t v; } dims[] = {
        {"vocab_size", v}, {"embed_dim", d}, {"context_len", t}, {"hidden_dim", hid}, {"num_heads", h}};
    for (size_t i = 0; i < sizeof dims / sizeof dims[0]; i++)
        if (dims[i].v < 1 || dims[i].v > MAX_DIM)
            return fail(err, errlen, "version-2 header: %s = %u is outside 1..%u", dims[i].what, dims[i].v, MAX_DIM);
    if (d % h) return fail(err, errlen, "version-2 header: embed_dim %u is not divisible by num_heads %u", d, h);
    if (n_frozen + n_active != n)
        return fail(err, errlen, "version-2 header: %u frozen + %u active != %u neurons", n_frozen, n_active, n);
    if (n_norms != 3) return fail(err, errlen, "version-2 header: %u norms, expected 3", n_norms);
    if (off[7] != size)
        return fail(err, errlen, "version-2 header: total size %llu but the file is %zu bytes",
                    (unsigned long long)off[7], size);
    if ((uint64_t)v * d > MAX_ELEMENTS || (uint64_t)t * d > MAX_ELEMENTS || (uint64_t)hid * d > MAX_ELEMENTS ||
        (uint64_t)d * d > MAX_ELEMENTS || (uint64_t)n * d > MAX_ELEMENTS)
        return fail(err, errlen, "version-2 header: a tensor of these dimensions would hold more than 2^31 elements");
    /* every product below is of values < 2^32 held in uint64_t: at most 2^20 * 2^20 * ... < 2^64 */
    uint64_t V = v, D = d, T = t, H = hid, N = n;
    uint64_t sizes[7] = {4 * V * D, 4 * T * D, 16 * (D * D + D), 4 * (2 * N * D + N), 4 * (2 * H * D + H + D),
                         mixed8 ? 16 + V * D + V : 4 * (V * D + V), 24 * D};
    static const char *const names[7] = {"embed", "pos", "causal", "geo", "ffn", "head", "norm"};
    span spans[7];
    int n_spans = 0;
    for (int i = 0; i < 7; i++) {
        if (!range_ok(off[i], sizes[i], HEADER_BYTES, size))
            return fail(err, errlen, "version-2 section %s: bytes %llu..%llu lie outside 64..%zu", names[i],
                        (unsigned long long)off[i], (unsigned long long)(off[i] + sizes[i]), size);
        if (sizes[i]) spans[n_spans++] = (span){off[i], off[i] + sizes[i], names[i]};  /* empty: no bytes to share */
    }
    qsort(spans, (size_t)n_spans, sizeof *spans, span_cmp);
    for (int i = 1; i < n_spans; i++)
        if (spans[i].start < spans[i - 1].end)
            return fail(err, errlen, "version-2 sections %s and %s overlap", spans[i - 1].name, spans[i].name);

    /* the arrays are not aligned in these files: copy them, 16-byte aligned, into one arena */
    f->arena_size = size + 64 * 40 + N;
    f->arena = malloc(f->arena_size);
    crystal_block *blk = calloc(1, sizeof *blk);
    f->blocks = blk;
    if (!f->arena || !blk) return fail(err, errlen, "out of memory loading a %zu-byte file", size);
    memset(m, 0, sizeof *m);
    const uint8_t *cur = NULL;
    int bad = 0;
#define TAKE(t_, rows_, cols_)                                                           \
    do {                                                                                 \
        uint64_t cnt_ = (uint64_t)(rows_) * (cols_);                                     \
        float *dst_ = arena_alloc(f, 4 * cnt_);                                          \
        if (!dst_) return fail(err, errlen, "out of memory loading a version-2 file");   \
        memcpy(dst_, cur, 4 * cnt_);                                                     \
        cur += 4 * cnt_;                                                                 \
        bad |= !all_finite(dst_, cnt_);                                                  \
        (t_) = (crystal_tensor){dst_, CRYSTAL_F32, CRYSTAL_Q_NONE, (int)(rows_), (int)(cols_), 0, NULL, NULL}; \
    } while (0)
    cur = buf + off[0];
    TAKE(m->token_embed, v, d);
    cur = buf + off[1];
    TAKE(m->pos_embed, t, d);
    cur = buf + off[2];
    TAKE(blk->attn.q_weight, d, d);
    TAKE(blk->attn.q_bias, 1, d);
    TAKE(blk->attn.k_weight, d, d);
    TAKE(blk->attn.k_bias, 1, d);
    TAKE(blk->attn.v_weight, d, d);
    TAKE(blk->attn.v_bias, 1, d);
    TAKE(blk->attn.out_weight, d, d);
    TAKE(blk->attn.out_bias, 1, d);
    cur = buf + off[3];
    TAKE(blk->field.positions, n, d);
    TAKE(blk->field.values, n, d);
    TAKE(blk->field.temperature, 1, n);
    blk->field.n_neurons = (int)n;
    uint8_t *frozen = arena_alloc(f, N ? N : 1);
    if (!frozen) return fail(err, errlen, "out of memory loading a version-2 file");
    memset(frozen, 0, N ? N : 1);  /* the file keeps only the count of frozen neurons */
    blk->field.frozen = frozen;
    cur = buf + off[4];
    TAKE(blk->ffn.fc1_weight, hid, d);
    TAKE(blk->ffn.fc1_bias, 1, hid);
    TAKE(blk->ffn.fc2_weight, d, hid);
    TAKE(blk->ffn.fc2_bias, 1, d);
    cur = buf + off[5];
    if (mixed8) {
        crystal_tensor q;
        TAKE(q, 1, 4); /* w scale, w offset, b scale, b offset */
        const float *p = q.data;
        int8_t *codes = arena_alloc(f, V * D + V);
        if (!codes) return fail(err, errlen, "out of memory loading a version-2 file");
        memcpy(codes, cur, V * D + V);
        m->head_weight = (crystal_tensor){codes, CRYSTAL_I8, CRYSTAL_Q_TENSOR, (int)v, (int)d, 0, p, p + 1};
        m->head_bias = (crystal_tensor){codes + V * D, CRYSTAL_I8, CRYSTAL_Q_TENSOR, 1, (int)v, 0, p + 2, p + 3};
        if (!bad && (!codes_finite(&m->head_weight) || !codes_finite(&m->head_bias)))  /* NaN: said below */
            return fail(err, errlen, "%s: a code times its scale, plus its offset, overflows float32",
                        codes_finite(&m->head_weight) ? "head.bias" : "head.weight");
    } else {
        TAKE(m->head_weight, v, d);
        TAKE(m->head_bias, 1, v);
    }
    cur = buf + off[6];
    TAKE(blk->ln1.weight, 1, d);
    TAKE(blk->ln1.bias, 1, d);
    TAKE(blk->ln2.weight, 1, d);
    TAKE(blk->ln2.bias, 1, d);
    TAKE(blk->ln3.weight, 1, d);
    TAKE(blk->ln3.bias, 1, d);
#undef TAKE
    if (bad) return fail(err, errlen, "version-2 file: NaN or Inf values in a float32 array");
    m->vocab_size = m->orig_vocab_size = (int)v;
    m->d_model = (int)d;
    m->n_ctx = (int)t;
    m->n_heads = (int)h;
    m->n_blocks = 1;
    m->ffn_hidden = (int)hid;
    m->field_norm = 1;
    m->field_eps = 1e-8f;
    m->ln_eps = 1e-5f;
    m->blocks = blk;
    m->tokenizer = CRYSTAL_TOK_NONE;
    return 0;
}

/* --- entry points ------------------------------------------------------------------------- */

int crystal_load_bytes(crystal_file *f, crystal_model *m, const uint8_t *buf, size_t size, char *err, size_t errlen) {
    const uint16_t probe = 1;
    if (*(const uint8_t *)&probe != 1) /* tensors are used in place, as stored: little-endian */
        return fail(err, errlen, "this runtime needs a little-endian machine");
    if (size < 8) return fail(err, errlen, "file is %zu bytes, too short for a .crystal header", size);
    if (rd32(buf) != MAGIC) return fail(err, errlen, "not a .crystal file (bad magic)");
    unsigned version = rd16(buf + 4);
    int rc;
    if (version == 2) rc = load_v2(f, m, buf, size, err, errlen);
    else if (version == 3) rc = load_v3(f, m, buf, size, err, errlen);
    else rc = fail(err, errlen, "unsupported .crystal version %u (this runtime reads 2 and 3)", version);
    /* the table is only needed while loading */
    free(f->entries);
    free(f->spans);
    f->entries = NULL;
    f->spans = NULL;
    return rc;
}

int crystal_load_file(crystal_file *f, crystal_model *m, const char *path, char *err, size_t errlen) {
    memset(f, 0, sizeof *f);
    errno = 0;
    FILE *fp = fopen(path, "rb");
    if (!fp) return fail(err, errlen, "%s: cannot open (%s)", path, errno ? strerror(errno) : "unknown reason");
    /* a folder opens on some systems and then reports an absurd size: read one byte before trusting it */
    errno = 0;
    if (fgetc(fp) == EOF && ferror(fp)) {
        fclose(fp);
        return fail(err, errlen, "%s: cannot read (%s)", path, errno ? strerror(errno) : "unknown reason");
    }
    long size = -1;
    if (fseek(fp, 0, SEEK_END) == 0) size = ftell(fp);
    if (size < 0 || fseek(fp, 0, SEEK_SET) != 0) {
        fclose(fp);
        return fail(err, errlen, "%s: cannot read", path);
    }
    /* malloc's alignment (>= 16) with the file's 64-byte aligned sections keeps every array aligned */
    f->buf = malloc(size ? (size_t)size : 1);
    if (!f->buf) {
        fclose(fp);
        return fail(err, errlen, "%s: out of memory for a %ld-byte file", path, size);
    }
    size_t got = fread(f->buf, 1, (size_t)size, fp);
    fclose(fp);
    if (got != (size_t)size) return fail(err, errlen, "%s: cannot read", path);
    char inner[400];
    if (crystal_load_bytes(f, m, f->buf, (size_t)size, inner, sizeof inner))
        return fail(err, errlen, "%s: %s", path, inner);
    return 0;
}

void crystal_file_free(crystal_file *f) {
    free(f->buf);
    free(f->arena);
    free(f->blocks);
    free(f->char_offsets);
    free(f->entries);
    free(f->spans);
    memset(f, 0, sizeof *f);
}

#ifdef CRYSTAL_LOADER_CHECK
/* A loader-only program: load, print one summary line, exit 0 (2 on a bad file). */
int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s MODEL.crystal\n", argv[0]);
        return 2;
    }
    crystal_file f;
    crystal_model m;
    char err[512];
    if (crystal_load_file(&f, &m, argv[1], err, sizeof err)) {
        fprintf(stderr, "crystal_runtime: error: %s\n", err);
        crystal_file_free(&f);
        return 2;
    }
    printf("V=%d D=%d T=%d H=%d L=%d F=%d orig=%d tokenizer=%d\n", m.vocab_size, m.d_model, m.n_ctx, m.n_heads,
           m.n_blocks, m.ffn_hidden, m.orig_vocab_size, m.tokenizer);
    crystal_file_free(&f);
    return 0;
}
#endif

#if !defined(CRYSTAL_LOADER_CHECK) && !defined(CRYSTAL_RUNTIME_NO_MAIN)
/* The runtime proper: MODEL.crystal first, then the spec's options, which
 * crystal_main (templates/c/crystal_cli.c, shared with the generated programs)
 * parses and runs. The seeds' positional form `MODEL.crystal PROMPT [N [TEMP]]`
 * is rewritten into `--prompt PROMPT -n N -t TEMP` first. */
static void runtime_usage(const char *prog) {
    printf("usage: %s MODEL.crystal --prompt TEXT | --prompt-ids ID,ID,... [-n N] [-t TEMP] [--top-p P]\n"
           "       [--seed S] [--shift K] [--threads N]\n"
           "   or: %s MODEL.crystal --prompt TEXT | --prompt-ids ID,ID,... --logits [--threads N]\n"
           "   or: %s MODEL.crystal PROMPT [N [TEMP]] [options]   (the seeds' positional form)\n"
           "the options as every generated program takes them (the program's --help says each)\n", prog, prog,
           prog);
}

/* -h or --help as an option, not as an option's value (--prompt --help is a prompt) */
static int asks_for_help(int argc, char **argv) {
    static const char *const with_value[] = {"--prompt", "--prompt-ids", "-n", "-t", "--top-p", "--seed",
                                             "--shift", "--threads"};
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) return 1;
        for (size_t k = 0; k < sizeof with_value / sizeof *with_value; k++)
            if (!strcmp(argv[i], with_value[k])) {
                i++;
                break;
            }
    }
    return 0;
}

int main(int argc, char **argv) {
    /* the name it was run by, without the cache's folders: `crystalc run` passes its own */
    const char *prog = argc > 0 && argv[0] && argv[0][0] ? argv[0] : "crystal_runtime";
    const char *slash = strrchr(prog, '/');
    if (slash && slash[1]) prog = slash + 1;
    if (asks_for_help(argc, argv)) {  /* before the model is read, and with MODEL in the usage */
        runtime_usage(prog);
        return 0;
    }
    if (argc < 2 || argv[1][0] == '-') {
        fprintf(stderr, "%s: error: the first argument must be a .crystal model file (see --help)\n", prog);
        return 2;
    }
    char **args = malloc(((size_t)argc + 8) * sizeof *args);
    if (!args) {
        fprintf(stderr, "%s: error: out of memory\n", prog);
        return 2;
    }
    int n = 0;
    args[n++] = (char *)prog;
    /* the positional form's PROMPT [N [TEMP]] (at most three words before the first option), then any
     * options as they are: `MODEL.crystal "ROMEO:" 100 0.8 --seed 7` */
    static const char *const positional[] = {"--prompt", "-n", "-t"};
    int i = 2;
    for (int word = 0; i < argc && argv[i][0] != '-'; i++, word++) {
        if (word == 3) {
            fprintf(stderr, "%s: error: unexpected argument '%s' (the positional form is MODEL.crystal PROMPT "
                            "[N [TEMP]], then options)\n", prog, argv[i]);
            free(args);
            return 2;
        }
        args[n++] = (char *)positional[word];
        args[n++] = argv[i];
    }
    for (; i < argc; i++) args[n++] = argv[i];
    args[n] = NULL;
    crystal_file f;
    crystal_model m;
    char err[512];
    int rc;
    if (crystal_load_file(&f, &m, argv[1], err, sizeof err)) {
        for (char *c = err; *c; c++)
            if (*c == '\n' || *c == '\r') *c = ' ';  /* one line, even for a path with a newline */
        fprintf(stderr, "%s: error: %s\n", prog, err);
        rc = 2;
    } else {
        rc = crystal_main(&m, n, args);
    }
    crystal_file_free(&f);
    free(args);
    return rc;
}
#endif
