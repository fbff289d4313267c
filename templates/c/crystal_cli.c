/* crystal_cli.c: the command line every crystalc program shares (shared/spec/model.md,
 * "Generated programs"), over any filled crystal_model:
 *
 *   PROG --prompt "ROMEO:" [-n 100] [-t 0.8] [--top-p 0.9] [--seed 42] [--shift K] [--threads N]
 *   PROG --prompt-ids 5,17,3 --logits
 *
 * --prompt needs the model's char tokenizer, or a byte-level BPE crystalc lowered (UTF-8 text);
 * it prints the prompt and its continuation as text. --prompt-ids takes ids of the ORIGINAL
 * tokenizer (mapped through vocab_map) and prints the generated ids the same way,
 * comma-separated on one line. --logits prints the last prompt position's logits as
 * `<original-id> <logit %.9g>` per current vocabulary entry. Generation past the window
 * follows the spec: when the T positions are full, the oldest K (--shift) tokens are dropped
 * and the remaining T-K recomputed once.
 * Bad arguments: one line on stderr, exit status 2.
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crystal.h"
#include "unicode_classes.h"

#define EXIT_BAD 2

typedef struct {
    const char *prompt, *prompt_ids;
    int logits;
    long n_tokens;
    double temperature, top_p;
    unsigned long long seed;
    long shift;
    long threads;
} options;

static int bad(const char *prog, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    for (char *c = msg; *c; c++)
        if (*c == '\n' || *c == '\r') *c = ' ';  /* one line, whatever was quoted */
    fprintf(stderr, "%s: error: %s\n", prog, msg);
    return EXIT_BAD;
}

static void usage(const char *prog) {
    printf("usage: %s --prompt TEXT | --prompt-ids ID,ID,... [-n N] [-t TEMP] [--top-p P] [--seed S]\n"
           "       [--shift K] [--threads N]\n"
           "       %s --prompt TEXT | --prompt-ids ID,ID,... --logits [--threads N]\n"
           "  --prompt TEXT       text prompt (needs a char or byte-level BPE tokenizer); prints text\n"
           "  --prompt-ids IDS    comma-separated ids of the original tokenizer; prints ids\n"
           "  --logits            print `<original-id> <logit>` of the last prompt position, generate nothing\n"
           "  -n N                tokens to generate (default 100)\n"
           "  -t TEMP             sampling temperature, 0 = greedy (default 0.8)\n"
           "  --top-p P           nucleus sampling mass in (0, 1] (default 0.9)\n"
           "  --seed S            random seed (default 42)\n"
           "  --shift K           tokens dropped when the window is full, 1..n_ctx (default 1)\n"
           "  --threads N         threads for the matrix products, when built with OpenMP (default 1)\n",
           prog, prog);
}

static int parse_long(const char *s, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno) return -1;
    *out = v;
    return 0;
}

static int parse_double(const char *s, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    /* ERANGE with a finite result is underflow (1e-320 is a double, subnormal): a value, not an error */
    if (end == s || *end != '\0' || (errno && errno != ERANGE) || !isfinite(v)) return -1;
    *out = v;
    return 0;
}

/* --- vocabulary: original ids <-> current rows ------------------------------------------ */

static int orig_vocab(const crystal_model *m) {
    return m->orig_vocab_size > 0 ? m->orig_vocab_size : m->vocab_size;
}

static int original_id(const crystal_model *m, int row) { return m->vocab_map ? (int)m->vocab_map[row] : row; }

/* The current row of original id `id`, or -1 when it was pruned (vocab_map is increasing). */
static int current_row(const crystal_model *m, long id) {
    if (!m->vocab_map) return id < m->vocab_size ? (int)id : -1;
    int lo = 0, hi = m->vocab_size - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        if (m->vocab_map[mid] == id) return mid;
        if (m->vocab_map[mid] < id) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* Parse "5,17,3" into current rows; returns the count, or -1 after an error message. */
static int parse_prompt_ids(const crystal_model *m, const char *prog, const char *text, int32_t *rows, int cap) {
    int n = 0;
    const char *p = text;
    for (;;) {
        while (*p == ' ') p++;
        /* ASCII digits, a minus left for the range check to name: not strtol's plus sign or other blanks */
        const char *digits = p + (*p == '-');
        char *end = (char *)p;
        long id = 0;
        errno = 0;
        if (*digits >= '0' && *digits <= '9') id = strtol(p, &end, 10);
        if (end == p || errno) return bad(prog, "--prompt-ids: expected comma-separated integers, got '%s'", text), -1;
        if (id < 0 || id >= orig_vocab(m))
            return bad(prog, "--prompt-ids: token id %ld is outside the vocabulary 0..%d", id, orig_vocab(m) - 1), -1;
        int row = current_row(m, id);
        if (row < 0) return bad(prog, "--prompt-ids: token id %ld was pruned from this model's vocabulary", id), -1;
        if (n < cap) rows[n] = row;
        n++;
        p = end;
        while (*p == ' ') p++;
        if (*p == '\0') break;
        if (*p != ',') return bad(prog, "--prompt-ids: expected comma-separated integers, got '%s'", text), -1;
        p++;
    }
    return n;
}

/* --- the char tokenizer ----------------------------------------------------------------- */

static size_t token_text(const crystal_model *m, int orig, const char **text) {
    *text = m->chars + m->char_offsets[orig];
    return m->char_offsets[orig + 1] - m->char_offsets[orig];
}

/* The code point of the UTF-8 sequence at s, its length in *k; or -1, *k = 1, where the bytes there
 * (at most `left`) are no whole, well-formed sequence. */
static long utf8_char(const unsigned char *s, size_t left, size_t *k) {
    unsigned char b = s[0];
    size_t need = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : 2;
    /* the second byte's range excludes overlong forms, UTF-16 surrogates and code points past U+10FFFF */
    unsigned lo = b == 0xe0 ? 0xa0 : b == 0xf0 ? 0x90 : 0x80;
    unsigned hi = b == 0xed ? 0x9f : b == 0xf4 ? 0x8f : 0xbf;
    *k = 1;
    if ((b >= 0x80 && b < 0xc2) || b > 0xf4 || need > left) return -1;
    long cp = need == 1 ? b : b & (0x7f >> need);
    for (size_t j = 1; j < need; j++) {
        if (s[j] < (j == 1 ? lo : 0x80) || s[j] > (j == 1 ? hi : 0xbf)) return -1;
        cp = cp << 6 | (s[j] & 0x3f);
    }
    *k = need;
    return cp;
}

/* One character of a prompt as a message shows it: itself when it is printable UTF-8 (one whole,
 * well-formed sequence, no control character), else its first byte as \xNN (a newline or an
 * invalid byte would otherwise break or garble the one-line message). */
static const char *shown(char out[8], const char *s, size_t k) {
    size_t need;
    long cp = utf8_char((const unsigned char *)s, k, &need);
    if (need == k && cp >= 0x20 && cp != 0x7f && (cp < 0x80 || cp >= 0xa0)) {
        memcpy(out, s, k);
        out[k] = '\0';
    } else {
        snprintf(out, 8, "\\x%02x", (unsigned char)s[0]);
    }
    return out;
}

/* The bytes of the character at s as its first byte claims them (one for a stray continuation byte),
 * at most the `left` there are. */
static size_t char_bytes(const char *s, size_t left) {
    unsigned char b = (unsigned char)s[0];
    size_t k = b < 0x80 ? 1 : b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc0 ? 2 : 1;
    return k < left ? k : left;
}

/* Encode `text` one character (one UTF-8 sequence) at a time; -1 after an error message. */
static int encode_chars(const crystal_model *m, const char *prog, const char *text, int32_t *rows, int cap) {
    int n = 0;
    size_t len = strlen(text), i = 0;
    while (i < len) {
        size_t k = char_bytes(text + i, len - i);
        int found = -1;
        for (int id = 0; id < orig_vocab(m) && found < 0; id++) {
            const char *t;
            if (token_text(m, id, &t) == k && memcmp(t, text + i, k) == 0) found = id;
        }
        char c[8];
        if (found < 0)
            return bad(prog, "--prompt: character '%s' is not in the model's vocabulary", shown(c, text + i, k)), -1;
        int row = current_row(m, found);
        if (row < 0)
            return bad(prog, "--prompt: character '%s' was pruned from this model's vocabulary", shown(c, text + i, k)),
                   -1;
        if (n < cap) rows[n] = row;
        n++;
        i += k;
    }
    return n;
}

/* --- the byte-level BPE tokenizer (crystalc.tokenizer.byte_level_bpe) ------------------------ */

/* GPT-2's pre-tokenizer pattern, as Hugging Face tokenizers runs it:
 *   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * (the first alternative that matches wins). Its classes are the library's own, tabled in
 * unicode_classes.h: 'L' letters, 'N' numbers, 'S' spaces, 'O' the rest. */
static char char_class(long cp) {
    size_t lo = 0, hi = sizeof unicode_classes / sizeof *unicode_classes;
    while (lo < hi) {  /* the first range that ends at or after cp */
        size_t mid = lo + (hi - lo) / 2;
        if (unicode_classes[mid].last < (uint32_t)cp) lo = mid + 1;
        else hi = mid;
    }
    return lo < sizeof unicode_classes / sizeof *unicode_classes && unicode_classes[lo].first <= (uint32_t)cp
               ? unicode_classes[lo].cls : 'O';
}

/* The class of the character at s[i] of well-formed UTF-8 text, its length in *k. */
static char class_at(const unsigned char *s, size_t n, size_t i, size_t *k) {
    return char_class(utf8_char(s + i, n - i, k));
}

/* Where the piece that starts at s[i] ends. */
static size_t piece_end(const unsigned char *s, size_t n, size_t i) {
    static const char *const contractions[] = {"s", "t", "re", "ve", "m", "ll", "d"};
    if (s[i] == '\'') {
        for (size_t c = 0; c < sizeof contractions / sizeof *contractions; c++) {
            size_t len = strlen(contractions[c]);
            if (len <= n - i - 1 && memcmp(s + i + 1, contractions[c], len) == 0) return i + 1 + len;
        }
    }
    size_t k, j = i + (s[i] == ' ' && i + 1 < n);  /* " ?": the space joins a word, a number or the rest */
    char cls = class_at(s, n, j, &k);
    if (cls != 'S') {
        while (j < n && class_at(s, n, j, &k) == cls) j += k;
        return j;
    }
    /* a run of spaces: all of it at the end; before anything else, all but its last (a word's " ?") */
    size_t end = i, last = i, count = 0;
    for (; end < n && class_at(s, n, end, &k) == 'S'; end += k, count++) last = end;
    return end == n || count == 1 ? end : last;
}

/* The rank of merging ids (a, b) and the id it makes, or -1: a binary search of the table. */
static int merge_rank(const crystal_model *m, int32_t a, int32_t b, int32_t *merged) {
    int lo = 0, hi = m->bpe_n_merges - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        const int32_t *e = m->bpe_merges + 4 * (size_t)mid;
        if (e[0] == a && e[1] == b) {
            *merged = e[3];
            return e[2];
        }
        if (e[0] < a || (e[0] == a && e[1] < b)) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}

/* The merges still to make in a piece: (rank, left symbol's position, the pair's ids), a min-heap on
 * (rank, position) so that the lowest rank, leftmost among equals, comes first; an entry whose symbols
 * have changed since it was pushed is passed over when it comes up. */
typedef struct { int rank, pos; int32_t left, right; } bpe_merge;

static int merge_before(const bpe_merge *a, const bpe_merge *b) {
    return a->rank < b->rank || (a->rank == b->rank && a->pos < b->pos);
}

static void heap_push(bpe_merge *h, size_t *n, bpe_merge e) {
    size_t i = (*n)++;
    for (; i > 0 && merge_before(&e, &h[(i - 1) / 2]); i = (i - 1) / 2) h[i] = h[(i - 1) / 2];
    h[i] = e;
}

static bpe_merge heap_pop(bpe_merge *h, size_t *n) {
    bpe_merge top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n) break;
        if (c + 1 < *n && merge_before(&h[c + 1], &h[c])) c++;
        if (!merge_before(&h[c], &last)) break;
        h[i] = h[c];
        i = c;
    }
    if (*n) h[i] = last;
    return top;
}

/* The pair of symbols p and next[p], pushed when it has a rank. */
static void push_pair(const crystal_model *m, bpe_merge *h, size_t *n, const int32_t *w, const int *next, int p) {
    int32_t merged = 0;
    int r = next[p] < 0 ? -1 : merge_rank(m, w[p], w[next[p]], &merged);
    if (r >= 0) heap_push(h, n, (bpe_merge){r, p, w[p], w[next[p]]});
}

/* Encode `text` as rows: each piece starts as one id a byte, and the adjacent pair of lowest rank
 * is merged (the leftmost among equals) until no pair has a rank, as the tokenizers library does:
 * the symbols a linked list, the pairs a heap, so a piece of k bytes costs O(k log k). cap > strlen(text). */
static int encode_bpe(const crystal_model *m, const char *prog, const char *text, int32_t *rows, int cap) {
    const unsigned char *s = (const unsigned char *)text;
    size_t len = strlen(text);
    for (size_t i = 0, k; i < len; i += k) {
        char c[8];
        if (utf8_char(s + i, len - i, &k) < 0)
            return bad(prog, "--prompt: byte %zu ('%s') is not part of a UTF-8 character; the text must be UTF-8",
                       i, shown(c, text + i, 1)), -1;
    }
    (void)cap;  /* a byte makes at most one id: n <= strlen(text) < cap */
    int *next = malloc((len + 1) * sizeof *next), *prev = malloc((len + 1) * sizeof *prev);
    bpe_merge *heap = malloc((3 * len + 1) * sizeof *heap);  /* k - 1 pairs, then at most 2 a merge */
    int n = 0;
    if (!next || !prev || !heap) {
        bad(prog, "out of memory encoding a prompt of %zu bytes", len);
        n = -1;
        goto done;
    }
    for (size_t i = 0; i < len;) {
        size_t end = piece_end(s, len, i);
        int32_t *w = rows + n;
        int k = (int)(end - i);
        for (int p = 0; p < k; p++) {
            w[p] = m->bpe_byte_ids[s[i + (size_t)p]];
            prev[p] = p - 1;
            next[p] = p + 1 < k ? p + 1 : -1;
        }
        i = end;
        size_t queued = 0;
        for (int p = 0; p + 1 < k; p++) push_pair(m, heap, &queued, w, next, p);
        while (queued) {
            bpe_merge e = heap_pop(heap, &queued);
            int p = e.pos, q = next[p];
            if (prev[p] == -2 || q < 0 || w[p] != e.left || w[q] != e.right) continue;  /* changed since */
            int32_t merged = w[p];
            merge_rank(m, w[p], w[q], &merged);  /* found: the entry's pair is still these two symbols */
            w[p] = merged;  /* p takes q's place: q leaves the list */
            next[p] = next[q];
            if (next[q] >= 0) prev[next[q]] = p;
            prev[q] = -2;
            if (prev[p] >= 0) push_pair(m, heap, &queued, w, next, prev[p]);
            push_pair(m, heap, &queued, w, next, p);
        }
        int kept = 0;  /* the list in order, packed (symbol 0 is never merged away) */
        for (int p = 0; p >= 0; p = next[p]) w[kept++] = w[p];
        n += kept;
    }
    for (int j = 0; j < n; j++) {
        int row = current_row(m, rows[j]);
        if (row < 0) {
            bad(prog, "--prompt: its token %d was pruned from this model's vocabulary", (int)rows[j]);
            n = -1;
            goto done;
        }
        rows[j] = row;
    }
done:
    free(next);
    free(prev);
    free(heap);
    return n;
}

/* --- sampling --------------------------------------------------------------------------- */

/* splitmix64: a small, well-mixed generator; the same seed gives the same text everywhere */
static unsigned long long next_random(unsigned long long *state) {
    unsigned long long z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double uniform(unsigned long long *state) { return (double)(next_random(state) >> 11) * 0x1.0p-53; }

typedef struct { float p; int i; } candidate;

/* Sort candidates by probability, largest first, ties in id order (the order they come in):
 * a stable radix sort on the bits of p, 8 at a time. A probability is >= 0, and the bits of
 * non-negative floats order like the floats; flipped, they order largest first. Over ~10^4
 * candidates it is tens of microseconds where qsort took most of a millisecond. */
static void sort_by_probability(candidate *c, candidate *tmp, int n) {
    for (int shift = 0; shift < 32; shift += 8) {
        size_t count[257] = {0};
        for (int i = 0; i < n; i++) {
            uint32_t key;
            memcpy(&key, &c[i].p, sizeof key);
            count[((~key >> shift) & 0xff) + 1]++;
        }
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (int i = 0; i < n; i++) {
            uint32_t key;
            memcpy(&key, &c[i].p, sizeof key);
            tmp[count[(~key >> shift) & 0xff]++] = c[i];
        }
        memcpy(c, tmp, (size_t)n * sizeof *c);
    }
}

/* The first index of the largest value, ignoring NaNs (0 when all are NaN). Two passes that
 * vectorise, unlike one scan carrying its index: the largest value through an integer key that
 * orders like the float (an integer maximum is a reduction compilers vectorise, a float one is
 * not without -ffast-math), then the smallest index holding it. A positive NaN would outrank
 * every key; then the plain scan decides. */
static int argmax(const float *v, int n) {
    int32_t best = INT32_MIN;
    for (int i = 0; i < n; i++) {
        int32_t bits;
        memcpy(&bits, v + i, sizeof bits);
        int32_t key = bits ^ ((bits >> 31) & 0x7fffffff);
        best = key > best ? key : best;
    }
    int32_t bits = best ^ ((best >> 31) & 0x7fffffff);
    float max;
    memcpy(&max, &bits, sizeof max);
    if (max != max) {
        int at = -1;
        for (int i = 0; i < n; i++)
            if (v[i] == v[i] && (at < 0 || v[i] > v[at])) at = i;
        return at < 0 ? 0 : at;
    }
    int first = n;
    for (int i = 0; i < n; i++) {
        int here = v[i] == max ? i : n;
        first = here < first ? here : first;
    }
    return first < n ? first : 0;
}

/* A current-vocabulary row from logits: greedy at temperature 0, else softmax(logits / t)
 * restricted to the smallest set of most likely tokens holding top_p of the mass. */
/* cand holds 2v candidates: the second half is the sort's scratch */
static int sample(const float *logits, int v, const options *o, unsigned long long *rng, candidate *cand) {
    int best = argmax(logits, v);
    if (o->temperature == 0.0) return best;
    float max = logits[best];
    double total = 0.0;
    for (int i = 0; i < v; i++) {
        cand[i].p = (float)exp((double)(logits[i] - max) / o->temperature);
        cand[i].i = i;
        total += cand[i].p;
    }
    int n = v;
    if (o->top_p < 1.0) {
        /* a token below (1 - top_p) / (v - 1) of the mass is never needed to reach top_p,
         * except the most likely one, which always is */
        double cutoff = v > 1 ? (1.0 - o->top_p) / (v - 1) * total : 0.0;
        n = 0;
        for (int i = 0; i < v; i++)
            if (cand[i].p >= cutoff || i == best) cand[n++] = cand[i];
        sort_by_probability(cand, cand + v, n);
        double mass = 0.0;
        int keep = n;
        for (int i = 0; i < n; i++) {
            mass += cand[i].p;
            if (mass >= o->top_p * total) {
                keep = i + 1;
                break;
            }
        }
        n = keep;
        total = mass;
    }
    double r = uniform(rng) * total, acc = 0.0;
    for (int i = 0; i < n; i++) {
        acc += cand[i].p;
        if (r < acc) return cand[i].i;
    }
    return cand[n - 1].i;
}

/* --- output ----------------------------------------------------------------------------- */

static void print_token(const crystal_model *m, int row, int text, int first) {
    if (text) {
        const char *t;
        size_t len = token_text(m, original_id(m, row), &t);
        fwrite(t, 1, len, stdout);
    } else {
        printf(first ? "%d" : ",%d", original_id(m, row));
    }
    fflush(stdout);
}

/* --- main ------------------------------------------------------------------------------- */

enum { OPT_PROMPT, OPT_PROMPT_IDS, OPT_LOGITS, OPT_N, OPT_T, OPT_TOP_P, OPT_SEED, OPT_SHIFT, OPT_THREADS, N_OPTIONS };
static const char *const OPTION_NAMES[N_OPTIONS] = {
    [OPT_PROMPT] = "--prompt", [OPT_PROMPT_IDS] = "--prompt-ids", [OPT_LOGITS] = "--logits", [OPT_N] = "-n",
    [OPT_T] = "-t", [OPT_TOP_P] = "--top-p", [OPT_SEED] = "--seed", [OPT_SHIFT] = "--shift",
    [OPT_THREADS] = "--threads"};
/* the options only generation reads */
static const unsigned GENERATION_OPTIONS =
    1u << OPT_N | 1u << OPT_T | 1u << OPT_TOP_P | 1u << OPT_SEED | 1u << OPT_SHIFT;

static int parse_options(const char *prog, int argc, char **argv, options *o, int *help) {
    unsigned given = 0;  /* bit k: OPTION_NAMES[k] was on the command line */
    *help = 0;
    o->prompt = o->prompt_ids = NULL;
    o->logits = 0;
    o->n_tokens = 100;
    o->temperature = 0.8;
    o->top_p = 0.9;
    o->seed = 42;
    o->shift = 1;
    o->threads = 1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i], *val = NULL;
        char name[32];
        const char *eq = strncmp(arg, "--", 2) == 0 ? strchr(arg, '=') : NULL;
        size_t len = eq ? (size_t)(eq - arg) : strlen(arg);
        if (len >= sizeof name) len = sizeof name - 1;
        memcpy(name, arg, len);
        name[len] = '\0';
        if (!strcmp(name, "-h") || !strcmp(name, "--help")) {
            *help = 1;
            return 0;
        }
        int known = -1;
        for (int k = 0; k < N_OPTIONS; k++)
            if (!strcmp(name, OPTION_NAMES[k])) known = k;
        if (known < 0) return bad(prog, arg[0] == '-' ? "unknown option '%s' (see --help)" : "unexpected argument '%s'",
                                  arg);
        /* a second value would silently replace the first: say so rather than guess which was meant */
        if (given & (1u << known)) return bad(prog, "%s given twice", name);
        given |= 1u << known;
        if (known == OPT_LOGITS) {
            if (eq) return bad(prog, "--logits takes no value");
            o->logits = 1;
            continue;
        }
        if (eq) val = eq + 1;
        else if (i + 1 < argc) val = argv[++i];
        else return bad(prog, "%s needs a value", name);
        long l;
        double d;
        switch (known) {
        case OPT_PROMPT: o->prompt = val; break;
        case OPT_PROMPT_IDS: o->prompt_ids = val; break;
        case OPT_N:
            if (parse_long(val, &l) || l < 0 || l > 1000000000L)
                return bad(prog, "-n: expected a count of tokens in 0..1000000000, got '%s'", val);
            o->n_tokens = l;
            break;
        case OPT_T:
            if (parse_double(val, &d) || d < 0)
                return bad(prog, "-t: expected a temperature >= 0 within a double's range, got '%s'", val);
            o->temperature = d;
            break;
        case OPT_TOP_P:
            if (parse_double(val, &d) || !(d > 0 && d <= 1))
                return bad(prog, "--top-p: expected a value in (0, 1], got '%s'", val);
            o->top_p = d;
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            long long s = strtoll(val, &end, 10);
            if (end == val || *end != '\0' || errno)
                return bad(prog, "--seed: expected an integer in -2^63..2^63-1, got '%s'", val);
            o->seed = (unsigned long long)s;
            break;
        }
        case OPT_THREADS:
            if (parse_long(val, &l) || l < 1 || l > 1024)
                return bad(prog, "--threads: expected a count of threads in 1..1024, got '%s'", val);
            o->threads = l;
            break;
        default: /* OPT_SHIFT; its range needs the model's window, checked by crystal_main */
            if (parse_long(val, &l)) return bad(prog, "--shift: expected a count of tokens in 1..n_ctx, got '%s'", val);
            o->shift = l;
        }
    }
    if (!o->prompt == !o->prompt_ids) return bad(prog, "give exactly one of --prompt and --prompt-ids");
    if (o->logits)  /* --logits generates nothing: a sampling option beside it is a mistaken command line */
        for (int k = 0; k < N_OPTIONS; k++)
            if (given & GENERATION_OPTIONS & (1u << k))
                return bad(prog, "%s has no effect with --logits, which prints the prompt's logits and generates "
                           "nothing", OPTION_NAMES[k]);
    return 0;
}

int (*crystal_device_check)(const char *prog) = NULL;

int crystal_main(const crystal_model *m, int argc, char **argv) {
    const char *prog = argc > 0 && argv[0] ? argv[0] : "model";
    options o;
    int help;
    if (parse_options(prog, argc, argv, &o, &help)) return EXIT_BAD;
    if (help) {
        usage(prog);
        return 0;
    }
    int t = m->n_ctx, v = m->vocab_size;
    if (o.shift < 1 || o.shift > t) return bad(prog, "--shift %ld is outside 1..%d", o.shift, t);
    if (crystal_set_threads((int)o.threads))
        return bad(prog, "--threads %ld: this program was built without OpenMP (add -fopenmp to CFLAGS)", o.threads);
    if (o.prompt && m->tokenizer != CRYSTAL_TOK_CHAR && m->tokenizer != CRYSTAL_TOK_BPE)
        return bad(prog, m->tokenizer == CRYSTAL_TOK_NONE ? "--prompt: this model has no tokenizer; use --prompt-ids"
                   : "--prompt: this program cannot encode this model's tokenizer (it encodes characters, or a "
                     "plain byte-level BPE with the tables crystalc now writes beside it); use --prompt-ids, or "
                     "crystalc run");

    /* the prompt, as current rows; one longer than the window keeps its last T tokens. Read before the
     * device is looked for (a bad prompt is named as such where there is no GPU) and the state made */
    size_t cap = strlen(o.prompt ? o.prompt : o.prompt_ids) + 1;
    int32_t *prompt = malloc(cap * sizeof *prompt);
    int32_t *ctx = malloc((size_t)t * sizeof *ctx);
    candidate *cand = malloc((size_t)2 * v * sizeof *cand);
    crystal_state s;
    int have_state = 0, status = EXIT_BAD;
    if (!prompt || !ctx || !cand) {
        bad(prog, "out of memory for a model of %d tokens x %d positions", v, t);
        goto done;
    }
    int n = !o.prompt ? parse_prompt_ids(m, prog, o.prompt_ids, prompt, (int)cap)
            : m->tokenizer == CRYSTAL_TOK_BPE ? encode_bpe(m, prog, o.prompt, prompt, (int)cap)
            : encode_chars(m, prog, o.prompt, prompt, (int)cap);
    if (n == 0) bad(prog, "empty prompt");
    if (n <= 0) goto done;
    if (crystal_device_check && crystal_device_check(prog)) goto done;
    if (crystal_state_init(&s, m)) {
        bad(prog, "out of memory for a model of %d tokens x %d positions", v, t);
        goto done;
    }
    have_state = 1;
    status = 0;
    int len = n < t ? n : t;
    memcpy(ctx, prompt + (n - len), (size_t)len * sizeof *ctx);

    /* the prompt in one go: its positions' products are matrix products */
    const float *logits = crystal_forward_window(m, &s, ctx, 0, len, 1);
    if (o.logits) {
        for (int i = 0; i < v; i++) printf("%d %.9g\n", original_id(m, i), (double)logits[i]);
        goto done;
    }

    int text = o.prompt != NULL;
    if (text) fputs(o.prompt, stdout);
    unsigned long long rng = o.seed;
    for (long i = 0; i < o.n_tokens; i++) {
        int tok = sample(logits, v, &o, &rng, cand);
        print_token(m, tok, text, i == 0);
        if (i + 1 == o.n_tokens) break;
        if (len == t) {
            /* window full: drop the oldest K tokens, then recompute the rest and the new
             * token together (one batch of matrix products) */
            len -= (int)o.shift;
            memmove(ctx, ctx + o.shift, (size_t)len * sizeof *ctx);
            ctx[len] = tok;
            logits = crystal_forward_window(m, &s, ctx, 0, len + 1, 1);
        } else {
            ctx[len] = tok;
            logits = crystal_forward(m, &s, tok, len, 1);
        }
        len++;
    }
    if (o.n_tokens > 0 || text) putchar('\n');

done:
    if (have_state) crystal_state_free(&s);
    free(prompt);
    free(ctx);
    free(cand);
    /* a full disk or a closed pipe: the output is cut short, which exit 0 would call success */
    if ((fflush(stdout) != 0 || ferror(stdout)) && status == 0) status = bad(prog, "writing the output failed");
    return status;
}
