/* libFuzzer target for the portable runtime's .crystal loader.
 *
 * Build: clang -g -O1 -fsanitize=fuzzer,address,undefined -I templates/c fuzz/crystal_load_fuzz.c \
 *        templates/c/crystal_forward.c -lm
 * Inputs of even length get a correct CRC-32 written over their last four bytes
 * before loading, so that mutations reach the structural checks behind the
 * checksum; odd lengths are loaded as they are. A file the loader accepts is
 * walked end to end, so a pointer or size it let through that runs past the
 * file shows up as an AddressSanitizer report, and a small one is run through
 * the shared forward pass for two positions.
 */
#define CRYSTAL_RUNTIME_NO_MAIN
#include "../templates/runtime/crystal_runtime.c"

static volatile uint8_t sink;

static void walk(const crystal_tensor *t) {
    static const size_t size[3] = {4, 1, 2};
    size_t n = (size_t)t->rows * (size_t)t->cols * size[t->dtype];
    const uint8_t *p = t->data;
    for (size_t i = 0; i < n; i++) sink ^= p[i];
    size_t ns = 0;
    if (t->scheme == CRYSTAL_Q_TENSOR) ns = 1;
    else if (t->scheme == CRYSTAL_Q_ROW) ns = (size_t)t->rows;
    else if (t->scheme == CRYSTAL_Q_GROUP) ns = (size_t)t->rows * (((size_t)t->cols + t->group - 1) / t->group);
    const uint8_t *s = (const uint8_t *)t->scale, *o = (const uint8_t *)t->offset;
    for (size_t i = 0; i < 4 * ns; i++) sink ^= s[i] ^ (o ? o[i] : 0); /* no offsets under row and group */
}

static void walk_ln(const crystal_layer_norm *ln) {
    walk(&ln->weight);
    walk(&ln->bias);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf) return 0;
    memcpy(buf, data, size);
    if (size >= 68 && size % 2 == 0 && rd16(buf + 4) == 3) {
        uint32_t c = crystal_crc32(buf, size - 4);
        for (int k = 0; k < 4; k++) buf[size - 4 + k] = (uint8_t)(c >> (8 * k));
    }
    crystal_file f;
    crystal_model m;
    char err[512];
    memset(&f, 0, sizeof f);
    err[0] = 0;
    if (crystal_load_bytes(&f, &m, buf, size, err, sizeof err) == 0) {
        walk(&m.token_embed);
        walk(&m.pos_embed);
        for (int b = 0; b < m.n_blocks; b++) {
            const crystal_block *blk = &m.blocks[b];
            walk_ln(&blk->ln1);
            walk_ln(&blk->ln2);
            walk_ln(&blk->ln3);
            const crystal_tensor *ts[] = {&blk->attn.q_weight, &blk->attn.q_bias, &blk->attn.k_weight,
                                          &blk->attn.k_bias, &blk->attn.v_weight, &blk->attn.v_bias,
                                          &blk->attn.out_weight, &blk->attn.out_bias, &blk->field.positions,
                                          &blk->field.values, &blk->field.temperature, &blk->ffn.fc1_weight,
                                          &blk->ffn.fc1_bias, &blk->ffn.fc2_weight, &blk->ffn.fc2_bias};
            for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) walk(ts[i]);
            for (int j = 0; j < blk->field.n_neurons; j++) sink ^= blk->field.frozen[j];
        }
        if (m.final_norm) walk_ln(&m.ln_f);
        walk(&m.head_weight);
        walk(&m.head_bias);
        if (m.vocab_map)
            for (int i = 0; i < m.vocab_size; i++) sink ^= (uint8_t)m.vocab_map[i];
        if (m.tokenizer == CRYSTAL_TOK_CHAR)
            for (int i = 0; i < m.orig_vocab_size; i++)
                for (uint32_t k = m.char_offsets[i]; k < m.char_offsets[i + 1]; k++) sink ^= (uint8_t)m.chars[k];
        /* run it when its run state is small (the fuzzer's memory limit is not the loader's business) */
        if ((uint64_t)m.n_blocks * (uint64_t)m.n_ctx * (uint64_t)m.d_model <= (1u << 20)) {
            crystal_state s;
            if (crystal_state_init(&s, &m) == 0) {
                const float *logits = crystal_forward(&m, &s, m.vocab_size - 1, 0, 1);
                sink ^= (uint8_t)(logits[0] > 0);
                if (m.n_ctx > 1) crystal_forward(&m, &s, 0, 1, 1);
                crystal_state_free(&s);
            }
        }
    } else if (err[0] == 0 || strchr(err, '\n')) {
        __builtin_trap(); /* a rejection must say what is wrong, in one line */
    }
    crystal_file_free(&f);
    free(buf);
    return 0;
}
