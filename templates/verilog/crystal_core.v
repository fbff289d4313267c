// crystal_core: executes a crystalc fixed-point program for one token at a time.
//
// Copied by crystalc, unchanged, for every model; the model is its two ROMs
// (rom.hex: Q16.16 words read a word at a time; lanes.hex: what the lanes read
// together, a wide word a clock, Q16.16 words or a quantized tensor's codes,
// made words with the multipliers of scales.hex as they are read), its program
// (program.hex), and model.vh's sizes and the program's encoding (its fields,
// opcodes and flags); exp2.hex and gelu.hex hold the two function tables.
// The arithmetic is backends/fixedpoint.py's, word for word: Q16.16 values,
// exact 64-bit products and sums, round-half-up shifts, truncating division,
// saturation to 32 bits on every RAM write; `saturated` says that a saturation
// acted (fixedpoint.emulate_run's flag).
//
// Two stages, one step of a loop each a clock. The *issue* stage walks the
// instruction's loops (i, j, h, wp; the drain's dl beside them) and sends
// addresses to the memories; the *execute* stage, one clock behind, gets the
// words and does the arithmetic, the running sums and the RAM write of the step
// the issue stage sent. The memories are read synchronously (the word comes a
// clock after its address), as an FPGA's block RAMs are: W and M each have two
// read ports (M also one write port), L, its scales LS and the key and value
// caches K and V one (K and V also a write port with a write enable a lane),
// and no address depends on a word just read, except the function tables',
// which are small (257 and 1,025 words) and read where they are used.
// A read of the RAM word the execute stage writes in the same clock gets the
// new word (forwarding): that happens when a loop's last write is read by the
// next loop's first step (one position, one neuron).
//
// The units: a multiply-accumulate multiplier and a scaling one (34 x 34 bits:
// every operand is a stored word or a difference of two), one divider, one
// integer square root, an exp unit, a GELU unit; and LANES lanes, a multiplier
// each (model.vh's LANES, crystalc compile --lanes), for the linear layers, the
// neuron field and the attention, which read their words together: word wp of
// the lane ROM L or of a cache. A lane has a second, smaller multiplier, which
// makes a word of a code and its multiplier (word sp of LS).
//
// Protocol: hold `rst` high for a clock first (a synchronous reset of the
// control: the core is then idle, whatever its registers powered up as; the
// memories keep their words). Set `token` (a row of the current vocabulary) and
// `pos`, pulse `start` for one cycle while `busy` is low; `done` pulses when the
// program has halted. A token past the vocabulary or a position past the window
// would read words of other tensors and write past the caches: such a start is
// refused, `done` pulsing at once with `error` high (it stays high until the
// next start or reset), and nothing computed. Positions
// go 0, 1, 2, ... (the key/value caches hold the earlier ones). While idle, the
// core reads RAM word rd_addr for the outside: its value is on rd_data a clock
// later (the logits of the last token are at LOGITS + i). With `done`,
// `saturated` is high when a value of the run reached Q16.16's bound and was
// held there: the words are then not the model's, however in range they look.
// The logits' own clips are not counted: a clipped logit lies at the bound,
// where its reader sees it, and an earlier position's are never read.
`include "model.vh"

module crystal_core (
    input  wire        clk,
    input  wire        rst,
    input  wire        start,
    input  wire [31:0] token,
    input  wire [31:0] pos,
    output reg         done,
    output reg         error,  // the last start was refused (token or pos out of range)
    output reg         saturated,  // since the last start, a saturation (sat32) changed a value, not a logit
    output wire        busy,
    input  wire [31:0] rd_addr,
    output wire [31:0] rd_data
);
    localparam integer FRAC = 16;
    localparam integer COEF_FRAC = 24;  // a field's 1/(|tau| + 0.1) in the ROM is Q8.24 (fixedpoint.COEF_FRAC)
    localparam signed [63:0] LOG2E_Q30 = 64'sd1549082005;
    localparam signed [63:0] EXP_CAP = 64'sd1 <<< 60;
    localparam signed [63:0] GELU_LO = -64'sd524288;  // -8.0
    localparam signed [63:0] GELU_HI = 64'sd524288;   // 8.0
    // the opcodes and the flags' bit indices come from model.vh, which crystalc writes from the constants it
    // writes program.hex with (backends/fixedpoint.py, verilog.py): the core cannot disagree with its program
    localparam [31:0] OP_HALT = `OP_HALT, OP_TOKEN_EMBEDDING = `OP_TOKEN_EMBEDDING, OP_LAYER_NORM = `OP_LAYER_NORM,
                      OP_LINEAR = `OP_LINEAR, OP_CAUSAL_ATTENTION = `OP_CAUSAL_ATTENTION,
                      OP_NEURON_FIELD = `OP_NEURON_FIELD, OP_GELU = `OP_GELU;
    localparam integer ACCUMULATE = `FLAG_ACCUMULATE, PER_POSITION = `FLAG_PER_POSITION;  // linear
    localparam integer TO_KEYS = `FLAG_TO_KEYS, TO_VALUES = `FLAG_TO_VALUES;  // linear: the row goes into a cache
    localparam integer NORMALIZE = `FLAG_NORMALIZE, HAS_EPS = `FLAG_HAS_EPS;  // neuron_field
    localparam integer LANES = `LANES;

    reg [31:0] W [0:`ROM_WORDS-1];     // weights read a word at a time
    reg [32*LANES-1:0] L [0:`LANE_WORDS-1];  // weights the lanes read together, lane g in bits 32g + 31..32g
    reg [32*LANES-1:0] LS [0:`SCALE_WORDS-1]; // the multipliers (Q0.32) of the codes in L, a lane's in its bits
    reg [`INSTR_BITS-1:0] P [0:`PROGRAM_WORDS-1]; // the program, one word an instruction
    (* ram_style = "block" *) reg [31:0] M [0:`RAM_WORDS-1];  // activations, scores, logits
    reg [32*LANES-1:0] K [0:`KEY_WORDS-1];    // the key caches, LANES positions side by side
    reg [32*LANES-1:0] V [0:`VALUE_WORDS-1];  // the value caches, LANES components of a head side by side
    reg [31:0] EXP2 [0:256];           // 2^(i/256), Q29
    reg [31:0] GELU [0:1024];          // GELU(-8 + i/64), Q16
    initial begin
        $readmemh("rom.hex", W);
        $readmemh("lanes.hex", L);
        $readmemh("scales.hex", LS);
        $readmemh("program.hex", P);
        $readmemh("exp2.hex", EXP2);
        $readmemh("gelu.hex", GELU);
    end

    // --- the arithmetic -------------------------------------------------------------------
    function signed [63:0] sx(input [31:0] v);  // a stored word as a signed value
        sx = {{32{v[31]}}, v};
    endfunction

    function [31:0] sat32(input signed [63:0] a);
        if (a > 64'sd2147483647) sat32 = 32'h7fffffff;
        else if (a < -64'sd2147483648) sat32 = 32'h80000000;
        else sat32 = a[31:0];
    endfunction

    function clips(input signed [63:0] a);  // sat32 changes a
        clips = a > 64'sd2147483647 || a < -64'sd2147483648;
    endfunction

    function signed [33:0] s34(input [31:0] v);  // a stored word as a multiplier operand
        s34 = {{2{v[31]}}, v};
    endfunction

    function signed [63:0] rshift_round(input signed [63:0] a, input integer s);
        rshift_round = (a + (64'sd1 <<< (s - 1))) >>> s;
    endfunction

    function [63:0] isqrt(input [63:0] v);  // floor(sqrt(v)), one result bit per step
        reg [63:0] rem, root, b;
        integer i;
        begin
            rem = v; root = 0; b = 64'h4000000000000000;
            for (i = 0; i < 32; i = i + 1) begin
                if (rem >= root + b) begin
                    rem = rem - (root + b);
                    root = (root >> 1) + b;
                end else begin
                    root = root >> 1;
                end
                b = b >> 2;
            end
            isqrt = root;
        end
    endfunction

    // 2^y in Q30 for y in Q24 = 2^n * 2^f: 2^f (Q29) interpolated between the table entries lo, hi
    function signed [63:0] exp2_finish(input signed [63:0] y, input signed [63:0] lo, input signed [63:0] hi);
        reg signed [63:0] sh, rsh, t, base, shifted;
        begin
            sh = (y >>> 24) + 1;
            t = {48'd0, y[15:0]};
            base = lo + rshift_round((hi - lo) * t, 16);
            if (sh >= 0) begin
                shifted = base <<< (sh > 31 ? 31 : sh);
                exp2_finish = (sh > 31 || shifted > EXP_CAP) ? EXP_CAP : shifted;
            end else begin
                rsh = -sh;
                exp2_finish = (rsh >= 63) ? 64'sd0 : rshift_round(base, rsh[31:0]);
            end
        end
    endfunction

    // --- the issue stage: one instruction at a time, its loops one step a clock ----------------
    localparam [4:0] S_IDLE = 0, S_FETCH = 1, S_NEXT = 2,
                     S_TOKEN_EMBEDDING = 3,
                     S_LN_SUM = 4, S_LN_VAR = 5, S_LN_OUT = 6,
                     S_LINEAR = 7,
                     S_ATT_SCORE = 8, S_ATT_EXP = 9, S_ATT_OUT = 10,
                     S_NF_DIST = 11, S_NF_EXP = 12, S_NF_EPS = 13, S_NF_OUT = 14,
                     S_GELU = 15, S_LINEAR_DRAIN = 16, S_NF_DIST_DRAIN = 17, S_NF_OUT_DRAIN = 18,
                     S_ATT_SCORE_DRAIN = 19, S_ATT_OUT_DRAIN = 20;
    reg [4:0] state = S_IDLE;
    reg [31:0] pc, tok, cur, cur_group, cur_lane;  // cur's group of LANES positions and lane in it (the keys)
    reg [31:0] dst, src, a, b, c, n, m, s, k, flags;  // the fields of the instruction being run (op dispatched)
    reg [31:0] i, j, h, wp;                              // loop counters, weight pointer
    // the drain: finishes a group's LANES sums one a clock (rows di + dl, dl = 0 .. dlast) while the
    // issue stage runs the next group's pass or waits for it in the pass's drain state
    reg [4:0] drain = S_IDLE;
    reg [31:0] di, dl, dlast;
    // how a coded tensor's words are made (fixedpoint.FIELDS): a for linear's weight and the field's
    // positions, b for the field's values; the scale pointer sp (in LS), where its pass began, and the
    // steps it has stayed on its word
    /* verilator lint_off UNUSEDSIGNAL */  // the packing is 2 bits of its field; the offsets are the execute stage's
    reg [31:0] qa, sa, pa, ga, oa, qb, sb, pb, gb, ob;
    /* verilator lint_on UNUSEDSIGNAL */
    reg [31:0] sp, sp_pass, gc;
    // a lanes' pass: its rows (summed LANES at once) and steps (the terms of each sum)
    wire scores = state == S_ATT_SCORE || state == S_ATT_SCORE_DRAIN;
    wire outputs = state == S_ATT_OUT || state == S_ATT_OUT_DRAIN;
    wire distances = state == S_NF_DIST || state == S_NF_DIST_DRAIN;
    wire [31:0] rows = scores ? cur + 1 : outputs ? c : distances ? m : n;
    wire [31:0] steps = scores ? c : outputs ? cur + 1 : distances ? n : m;
    wire [`INSTR_BITS-1:0] instr = P[pc];
    // the pass's tensor in the lane ROM: a word a step, or 2^pack codes a word, the last of a pass
    // ending its word; its multipliers move a word every scale_steps steps and scale_pass a pass
    wire values = state == S_NF_OUT;
    wire [1:0] pack = (state == S_LINEAR || state == S_NF_DIST) ? qa[1:0] : values ? qb[1:0] : 2'd0;
    wire [31:0] pack_mask = (32'd1 << pack) - 32'd1;
    wire [31:0] scale_pass = values ? pb : pa, scale_steps = values ? gb : ga;
    wire [4:0] drain_of = state == S_LINEAR ? S_LINEAR_DRAIN : state == S_NF_DIST ? S_NF_DIST_DRAIN
                          : state == S_NF_OUT ? S_NF_OUT_DRAIN : state == S_ATT_SCORE ? S_ATT_SCORE_DRAIN
                          : S_ATT_OUT_DRAIN;
    wire [31:0] group_rows = rows - i < LANES ? rows - i : LANES;  // rows i .. of this group

    always @(posedge clk) begin
        done <= 1'b0;
        if (drain != S_IDLE) begin  // a pass's end below may start the next drain in its last clock
            dl <= dl + 1;
            if (dl == dlast) drain <= S_IDLE;
        end
        case (state)
        S_IDLE: if (start) begin
            error <= token >= `VOCAB_SIZE || pos >= `N_CTX;
            if (token >= `VOCAB_SIZE || pos >= `N_CTX) done <= 1'b1;
            else begin
                tok <= token; cur <= pos; cur_group <= pos / LANES; cur_lane <= pos % LANES;
                pc <= 0; state <= S_FETCH;
            end
        end
        S_FETCH: begin  // the fields where model.vh says they lie
            dst <= instr[`FIELD_DST +: 32]; src <= instr[`FIELD_SRC +: 32];
            a <= instr[`FIELD_A +: 32]; b <= instr[`FIELD_B +: 32]; c <= instr[`FIELD_C +: 32];
            n <= instr[`FIELD_N +: 32]; m <= instr[`FIELD_M +: 32]; s <= instr[`FIELD_S +: 32];
            k <= instr[`FIELD_K +: 32]; flags <= instr[`FIELD_FLAGS +: 32];
            qa <= instr[`FIELD_QA +: 32]; sa <= instr[`FIELD_SA +: 32]; pa <= instr[`FIELD_PA +: 32];
            ga <= instr[`FIELD_GA +: 32]; oa <= instr[`FIELD_OA +: 32];
            qb <= instr[`FIELD_QB +: 32]; sb <= instr[`FIELD_SB +: 32]; pb <= instr[`FIELD_PB +: 32];
            gb <= instr[`FIELD_GB +: 32]; ob <= instr[`FIELD_OB +: 32];
            wp <= instr[`FIELD_A +: 32];
            sp <= instr[`FIELD_SA +: 32]; sp_pass <= instr[`FIELD_SA +: 32]; gc <= 0;
            i <= 0; j <= 0; h <= 0;
            case (instr[`FIELD_OP +: 32])
                // the execute stage has finished: it works on S_NEXT's empty step now
                OP_HALT:             begin done <= 1'b1; state <= S_IDLE; end
                OP_TOKEN_EMBEDDING:  state <= S_TOKEN_EMBEDDING;
                OP_LAYER_NORM:       state <= S_LN_SUM;
                OP_LINEAR:           state <= S_LINEAR;
                OP_CAUSAL_ATTENTION: state <= S_ATT_SCORE;
                OP_NEURON_FIELD:     state <= S_NF_DIST;
                OP_GELU:             state <= S_GELU;
                default:             begin done <= 1'b1; state <= S_IDLE; end
            endcase
        end
        S_NEXT: begin pc <= pc + 1; state <= S_FETCH; end

        // one loop over i: token_embedding, the three passes of layer_norm, gelu
        S_TOKEN_EMBEDDING, S_LN_OUT, S_GELU: begin
            i <= i + 1;
            if (i == n - 1) state <= S_NEXT;
        end
        S_LN_SUM, S_LN_VAR: begin
            i <= i + 1;
            if (i == n - 1) begin i <= 0; state <= state == S_LN_SUM ? S_LN_VAR : S_LN_OUT; end
        end

        // the lanes' passes: linear (rows: n outputs, steps: m columns), the field's distances
        // (rows: m neurons, steps: n components) and outputs (rows: n components, steps: m
        // neurons), the attention's scores (rows: positions 0..cur, steps: c components of head h)
        // and outputs (rows: c components, steps: positions). j over the steps of rows i .. i +
        // LANES - 1, a term a clock, wp walking the lane ROM or a cache; then the drain finishes
        // those rows' sums, one a clock, while the next LANES rows' pass runs. A drain takes at
        // most LANES clocks, so when a pass has fewer steps the issue stage waits for each drain
        S_LINEAR, S_NF_DIST, S_NF_OUT, S_ATT_SCORE, S_ATT_OUT: begin
            wp <= wp + (scores ? `KEY_GROUPS : ((j & pack_mask) == pack_mask || j == steps - 1) ? 1 : 0);
            gc <= gc + 1;
            if (gc == scale_steps - 1) begin gc <= 0; sp <= sp + 1; end
            j <= j + 1;
            if (j == steps - 1) begin
                j <= 0;
                gc <= 0; sp <= sp_pass + scale_pass; sp_pass <= sp_pass + scale_pass;
                drain <= drain_of; di <= i; dl <= 0; dlast <= group_rows - 1;
                i <= i + LANES;
                if (i + LANES < rows && steps >= LANES) begin  // the next group's words, at once
                    if (scores) wp <= wp + `KEY_GROUPS + 1 - c * `KEY_GROUPS;
                    if (outputs) wp <= wp + 1 + m * `N_CTX - (cur + 1);
                end else begin
                    state <= drain_of;
                end
            end
        end
        // waiting for the drain: at its last step, the next group's pass (its words: the next key
        // group, value group) or what follows the passes
        S_LINEAR_DRAIN, S_NF_DIST_DRAIN, S_NF_OUT_DRAIN, S_ATT_SCORE_DRAIN, S_ATT_OUT_DRAIN: begin
            if (dl == dlast) begin
                if (i < rows) begin
                    if (scores) wp <= wp + 1 - c * `KEY_GROUPS;
                    if (outputs) wp <= wp + m * `N_CTX - (cur + 1);
                    case (state)
                        S_LINEAR_DRAIN:    state <= S_LINEAR;
                        S_NF_DIST_DRAIN:   state <= S_NF_DIST;
                        S_NF_OUT_DRAIN:    state <= S_NF_OUT;
                        S_ATT_SCORE_DRAIN: state <= S_ATT_SCORE;
                        default:           state <= S_ATT_OUT;
                    endcase
                end else begin
                    i <= 0;
                    case (state)
                        S_NF_DIST_DRAIN:   state <= S_NF_EXP;
                        S_ATT_SCORE_DRAIN: state <= S_ATT_EXP;
                        S_ATT_OUT_DRAIN: begin  // the next head, or the end
                            h <= h + 1; wp <= a + (h + 1) * c * `KEY_GROUPS;
                            state <= h == m - 1 ? S_NEXT : S_ATT_SCORE;
                        end
                        default:           state <= S_NEXT;
                    endcase
                end
            end
        end

        // causal_attention, head h: the scores (a lanes' pass on the key cache, from a + h c
        // KEY_GROUPS), j over their exps, the outputs (a lanes' pass on the value cache, from
        // b + h N_CTX)
        S_ATT_EXP: begin
            j <= j + 1;
            if (j == cur) begin j <= 0; wp <= b + h * `N_CTX; state <= S_ATT_OUT; end
        end

        // neuron_field: the distances (a lanes' pass, above), j over the exps, the eps term, then
        // the outputs (a lanes' pass) on the values, from b in the lane ROM
        S_NF_EXP: begin
            j <= j + 1;
            if (j == m - 1) begin
                j <= 0; wp <= b; sp <= sb; sp_pass <= sb; gc <= 0;
                state <= (flags[NORMALIZE] && flags[HAS_EPS]) ? S_NF_EPS : S_NF_OUT;
            end
        end
        S_NF_EPS: state <= S_NF_OUT;
        default: state <= S_IDLE;
        endcase
        if (rst) begin state <= S_IDLE; drain <= S_IDLE; error <= 1'b0; end  // last, so it wins; done falls every clock
    end
    assign busy = state != S_IDLE;

    // the addresses the issue stage sends in each state (the lane ROM's is wp)
    /* verilator lint_off UNUSEDSIGNAL */  // addresses are 32 bits, as in the program; a memory uses what it needs
    reg [31:0] wa0, wa1, ma0, ma1;
    /* verilator lint_on UNUSEDSIGNAL */
    always @* begin
        wa0 = 0; wa1 = 0; ma0 = 0; ma1 = 0;
        case (state)
        S_IDLE: ma0 = rd_addr;
        S_TOKEN_EMBEDDING: begin wa0 = a + tok * n + i; wa1 = b + cur * n + i; end
        S_LN_SUM, S_LN_VAR, S_GELU: ma0 = src + i;
        S_LN_OUT: begin ma0 = src + i; wa0 = a + i; wa1 = b + i; end
        S_LINEAR: ma0 = src + j;  // the lanes' common word
        S_NF_DIST: ma0 = src + j;
        S_NF_OUT: ma0 = s + j;
        S_ATT_SCORE: ma0 = src + h * c + j;
        S_ATT_EXP, S_ATT_OUT: ma0 = s + j;
        S_NF_EXP: ma0 = s + j;
        default: ;
        endcase
        case (drain)  // the second ports, which no pass uses
        S_LINEAR_DRAIN: begin wa1 = b + di + dl; ma1 = dst + (flags[PER_POSITION] ? cur * n : 0) + di + dl; end
        S_NF_DIST_DRAIN: wa1 = c + di + dl;
        S_NF_OUT_DRAIN: ma1 = dst + di + dl;
        default: ;
        endcase
    end

    // --- the memories' read ports: registered, one clock from address to word --------------------
    // A RAM read of the word written in the same clock gets the written word: the block RAM gives
    // the old one (read first), and a flag taken with the read picks the write's word instead.
    // (A bypass written into the read itself makes Yosys find no block RAM for M.)
    reg [31:0] w0q, w1q, m0_ram, m1_ram, m_written;
    reg [32*LANES-1:0] lq, lsq, kq, vq;
    reg m_we;                       // the execute stage's one RAM write this clock
    reg [31:0] m_waddr, m_wdata;
    reg m0_fwd, m1_fwd;
    always @(posedge clk) begin
        if (m_we) M[m_waddr] <= m_wdata;
        w0q <= W[wa0];
        w1q <= W[wa1];
        lq <= L[wp];
        lsq <= LS[sp];
        kq <= K[wp];
        vq <= V[wp];
        m0_ram <= M[ma0];
        m1_ram <= M[ma1];
        m0_fwd <= m_we && m_waddr == ma0;
        m1_fwd <= m_we && m_waddr == ma1;
        m_written <= m_wdata;
    end
    wire [31:0] m0q = m0_fwd ? m_written : m0_ram, m1q = m1_fwd ? m_written : m1_ram;
    assign rd_data = m0q;

    // --- the execute stage: the step the issue stage sent a clock ago ---------------------------
    reg [4:0] state_x = S_IDLE;
    reg [4:0] drain_x = S_IDLE;
    reg [31:0] i_x, j_x, h_x, di_x, dl_x;
    reg last_x;  // a pass's last step: its sums are whole
    always @(posedge clk) begin
        state_x <= state; i_x <= i; j_x <= j; h_x <= h;
        drain_x <= drain; di_x <= di; dl_x <= dl; last_x <= j == steps - 1;
        if (rst) begin state_x <= S_IDLE; drain_x <= S_IDLE; end  // no write of a step that was never sent
    end

    // Every unit's operands are held at 0 outside the states that use it (operand isolation): a
    // unit then only switches when it works, which saves power in silicon and time in a simulator.
    wire signed [63:0] w0 = sx(w0q), w1 = sx(w1q), m0 = sx(m0q), m1 = sx(m1q);

    // the caches' one write port, a lane of a word: a linear layer's row of the current position
    reg c_we;
    /* verilator lint_off UNUSEDSIGNAL */  // addresses are 32 bits, as in the program; a memory uses what it needs
    reg [31:0] c_waddr;
    /* verilator lint_on UNUSEDSIGNAL */
    reg [31:0] c_lane;
    always @(posedge clk) begin : cache_write
        integer q;
        for (q = 0; q < LANES; q = q + 1)
            if (c_we && c_lane == q) begin
                if (flags[TO_KEYS]) K[c_waddr][32 * q +: 32] <= m_wdata;
                else V[c_waddr][32 * q +: 32] <= m_wdata;
            end
    end
    reg signed [63:0] acc, sum, den, mean, rr, mx, mn;
    reg [31:0] v_head, v_group, v_lane, v_comp;  // where a value-cache row goes: head, lane group, lane, component

    // the exp unit (causal_attention, neuron_field): exp_out = exp(exp_x) in Q30
    reg signed [63:0] exp_x;
    wire signed [63:0] exp_y = rshift_round(exp_x * LOG2E_Q30, 22);  // x log2(e), Q24
    wire [7:0] exp_i = exp_y[23:16];
    wire signed [63:0] exp_out = exp2_finish(exp_y, sx(EXP2[{1'b0, exp_i}]), sx(EXP2[{1'b0, exp_i} + 9'd1]));

    // the GELU unit: the table between -8 and 8, x beyond it on the right, 0 on the left
    reg signed [63:0] gelu_x;
    wire signed [63:0] gelu_u0 = gelu_x - GELU_LO;
    /* verilator lint_off UNUSEDSIGNAL */  // clamped to 20 bits
    wire signed [63:0] gelu_u = gelu_u0 < 0 ? 64'sd0 : (gelu_u0 > 64'sd1048575 ? 64'sd1048575 : gelu_u0);
    /* verilator lint_on UNUSEDSIGNAL */
    wire [10:0] gelu_i = {1'b0, gelu_u[19:10]};
    wire signed [63:0] gelu_lo = sx(GELU[gelu_i]), gelu_hi = sx(GELU[gelu_i + 11'd1]);
    wire signed [63:0] gelu_out = gelu_x >= GELU_HI ? gelu_x : (gelu_x < GELU_LO ? 64'sd0 :
                                  gelu_lo + rshift_round((gelu_hi - gelu_lo) * $signed({54'd0, gelu_u[9:0]}), 10));

    // the arithmetic units and their operands
    reg signed [33:0] mac_x, mac_y, scl_x, scl_y;
    wire signed [63:0] mac = acc + mac_x * mac_y;  // the running sum of products, this step's included
    wire signed [63:0] scaled = scl_x * scl_y;
    // a score (Q16 x Q16) or a field exponent (a Q16 distance x a Q8.24 coefficient)
    wire signed [63:0] scaled_wide = drain_x == S_NF_DIST_DRAIN ? rshift_round(scaled, COEF_FRAC)
                                                                : rshift_round(scaled, FRAC);
    wire signed [63:0] scaled_word = sx(sat32(scaled_wide));
    reg signed [63:0] div_n, div_d, sqrt_in;
    reg div_unsigned;  // LayerNorm's sum of squares: up to 2^64, read unsigned as the square root reads it
    wire signed [64:0] div_n65 = {div_unsigned ? 1'b0 : div_n[63], div_n};
    /* verilator lint_off UNUSEDSIGNAL */  // a quotient of 65-bit operands that fits 64 bits
    wire signed [64:0] quot65 = div_d == 0 ? 65'sd0 : div_n65 / $signed({div_d[63], div_d});
    /* verilator lint_on UNUSEDSIGNAL */
    wire signed [63:0] quot = quot65[63:0];  // truncates toward zero
    wire signed [63:0] root = $signed(isqrt(sqrt_in));

    // The lanes: the sums of rows i + g at once, each of its lane ROM word against a common word
    // x, a term a clock: w x for a linear layer's rows (x = src[j]) and the field's output
    // components (x = e_j), (x - w)^2 for the field's neurons (x = h[j]). A drain state then
    // finishes the sums one a clock through the one write port. Sums are exact, so any LANES gives
    // the same words.
    wire lane_on = state_x == S_LINEAR || state_x == S_NF_DIST || state_x == S_NF_OUT
                   || state_x == S_ATT_SCORE || state_x == S_ATT_OUT;
    wire [32*LANES-1:0] lane_words = state_x == S_ATT_SCORE ? kq : state_x == S_ATT_OUT ? vq : lq;
    wire signed [63:0] lane_sum [0:LANES-1];
    wire [31:0] lane_x = lane_on ? m0q : 32'd0;
    // a coded tensor's step j: the code in slot j mod 2^pack of the lane's word (8 or 16 bits), made
    // the word rshift_round(code x multiplier, 16) + offset (fixedpoint.Codes)
    wire [1:0] pack_x = (state_x == S_LINEAR || state_x == S_NF_DIST) ? qa[1:0] : state_x == S_NF_OUT ? qb[1:0] : 2'd0;
    wire coded = pack_x != 2'd0;
    wire [4:0] slot_shift = pack_x == 2'd2 ? {j_x[1:0], 3'd0} : {j_x[0], 4'd0};
    wire signed [63:0] offset_x = coded ? sx(state_x == S_NF_OUT ? ob : oa) : 64'sd0;
    genvar g;
    generate
        for (g = 0; g < LANES; g = g + 1) begin : lane
            wire [31:0] stored = lane_on ? lane_words[32 * g +: 32] : 32'd0;
            /* verilator lint_off UNUSEDSIGNAL */  // a code is the slot's low 8 or 16 bits; a word, 32 of made's
            wire [31:0] slot = coded ? stored >> slot_shift : 32'd0;
            wire signed [16:0] code = pack_x == 2'd2 ? {{9{slot[7]}}, slot[7:0]} : {slot[15], slot[15:0]};
            wire signed [32:0] mult = {1'b0, coded ? lsq[32 * g +: 32] : 32'd0};  // unsigned, below 2^32
            wire signed [49:0] product = code * mult;
            wire signed [63:0] made = rshift_round({{14{product[49]}}, product}, 16) + offset_x;
            /* verilator lint_on UNUSEDSIGNAL */
            wire [31:0] w = coded ? made[31:0] : stored;
            /* verilator lint_off UNUSEDSIGNAL */  // bits 63:34 only repeat the sign of a difference of two words
            wire signed [63:0] diff = sx(lane_x) - sx(w);
            /* verilator lint_on UNUSEDSIGNAL */
            wire signed [33:0] op_a = state_x == S_NF_DIST ? diff[33:0] : s34(w);
            wire signed [33:0] op_b = state_x == S_NF_DIST ? diff[33:0] : s34(lane_x);
            reg signed [63:0] row_sum, held;  // the running sum; the last whole one, for the drain
            wire signed [63:0] next_sum = (j_x == 0 ? 64'sd0 : row_sum) + op_a * op_b;
            always @(posedge clk)
                if (lane_on) begin
                    row_sum <= next_sum;
                    if (last_x) held <= next_sum;
                end
            assign lane_sum[g] = held;
        end
    endgenerate
    /* verilator lint_off UNUSEDSIGNAL */  // bits 63:34 only repeat the sign of these in-range values
    reg signed [63:0] dx, distance;
    /* verilator lint_on UNUSEDSIGNAL */
    wire [31:0] row_x = dst + (flags[PER_POSITION] ? cur * n : 0) + di_x + dl_x;  // the row a drain step writes
    // a value before its sat32, kept to see whether the saturation acts (clip): a clipped word is silently
    // wrong, so the run says so (`saturated`) rather than the host taking in-range outputs for the model's
    reg signed [63:0] wide;
    reg clip;

    always @* begin
        exp_x = 0; gelu_x = 0;
        mac_x = 0; mac_y = 0; scl_x = 0; scl_y = 0; div_n = 0; div_d = 1; div_unsigned = 1'b0; sqrt_in = 0;
        dx = 0; distance = 0; wide = 0; clip = 1'b0;
        m_we = 1'b0; m_waddr = 0; m_wdata = 0; c_we = 1'b0; c_waddr = 0; c_lane = 0;
        case (state_x)
        // token_embedding: x = token_embed[tok] + pos_embed[pos]
        S_TOKEN_EMBEDDING: begin
            wide = w0 + w1; clip = clips(wide);
            m_we = 1'b1; m_waddr = dst + i_x; m_wdata = sat32(wide);
        end

        // layer_norm: mean, then variance, then (x - mean) / sqrt(var + eps) * weight + bias
        S_LN_SUM: if (i_x == n - 1) begin div_n = acc + m0; div_d = {32'd0, n}; end
        S_LN_VAR: begin
            dx = m0 - mean; mac_x = dx[33:0]; mac_y = dx[33:0];
            if (i_x == n - 1) begin div_n = mac; div_d = {32'd0, n}; div_unsigned = 1'b1; sqrt_in = quot + sx(k); end
        end
        S_LN_OUT: begin
            div_n = (m0 - mean) <<< FRAC; div_d = rr;
            scl_x = s34(sat32(quot)); scl_y = w0[33:0];
            wide = rshift_round(scaled, FRAC) + w1; clip = clips(quot) || clips(wide);
            m_we = 1'b1; m_waddr = dst + i_x; m_wdata = sat32(wide);
        end

        // causal_attention, head h (width c): scores q.k / sqrt(c) over positions 0..pos into the
        // scratch (drained, below), then their exp (less the largest) and its sum, then
        // sum_j e_j v_j / sum (drained)
        S_ATT_EXP: begin exp_x = m0 - mx; m_we = 1'b1; m_waddr = s + j_x; m_wdata = exp_out[31:0]; end

        // neuron_field: a_j = |h - pos_j| / (|tau_j| + 0.1) into the scratch (drained), w_j =
        // exp(-a_j) (normalised: exp(a_min - a_j)), then x += sum_j w_j val_j (drained; normalised:
        // divided by sum_j w_j + eps e^(a_min))
        S_NF_EXP: begin
            exp_x = flags[NORMALIZE] ? mn - m0 : -m0;
            m_we = 1'b1; m_waddr = s + j_x; m_wdata = exp_out[31:0];
        end
        S_NF_EPS: exp_x = mn - sx(k);

        // gelu, in place
        S_GELU: begin
            gelu_x = m0; clip = clips(gelu_out);
            m_we = 1'b1; m_waddr = dst + i_x; m_wdata = sat32(gelu_out);
        end
        default: ;
        endcase

        // the drain's step, row di + dl of a group: beside a pass, which writes nothing and uses
        // none of these units
        case (drain_x)
        // linear: dst[i] (+)= sum_j W[i][j] src[j] + bias[i]
        S_LINEAR_DRAIN: begin
            wide = flags[ACCUMULATE] ? m1 + rshift_round(lane_sum[dl_x], FRAC) + w1
                                     : rshift_round(lane_sum[dl_x], FRAC) + w1;
            // the head's clips are left to the logits' readers, who see a clipped one at the bound: an
            // earlier position's logits are never read, and their clip would refuse a right run
            clip = clip || (clips(wide) && dst != `LOGITS); m_wdata = sat32(wide);
            if (flags[TO_KEYS]) begin  // key d of position cur: word d KEY_GROUPS + cur / LANES
                c_we = 1'b1; c_waddr = dst + (di_x + dl_x) * `KEY_GROUPS + cur_group; c_lane = cur_lane;
            end else if (flags[TO_VALUES]) begin  // k heads of width c: the counters follow the rows
                c_we = 1'b1; c_waddr = dst + (v_group * k + v_head) * `N_CTX + cur; c_lane = v_lane;
            end else begin
                m_we = 1'b1; m_waddr = row_x;
            end
        end
        S_ATT_SCORE_DRAIN: begin  // position di + dl
            scl_x = s34(sat32(rshift_round(lane_sum[dl_x], FRAC))); scl_y = s34(k);
            clip = clip || clips(rshift_round(lane_sum[dl_x], FRAC)) || clips(scaled_wide);
            m_we = 1'b1; m_waddr = s + di_x + dl_x; m_wdata = scaled_word[31:0];
        end
        S_ATT_OUT_DRAIN: begin  // component di + dl of head h
            div_n = lane_sum[dl_x]; div_d = sum;
            clip = clip || clips(quot);
            m_we = 1'b1; m_waddr = dst + h_x * c + di_x + dl_x; m_wdata = sat32(quot);
        end
        S_NF_DIST_DRAIN: begin  // neuron di + dl
            sqrt_in = lane_sum[dl_x]; distance = root; scl_x = distance[33:0]; scl_y = w1[33:0];
            clip = clip || clips(scaled_wide);
            m_we = 1'b1; m_waddr = s + di_x + dl_x; m_wdata = scaled_word[31:0];
        end
        S_NF_OUT_DRAIN: begin  // component di + dl
            div_n = lane_sum[dl_x]; div_d = den;
            m_we = 1'b1; m_waddr = dst + di_x + dl_x;
            wide = m1 + (flags[NORMALIZE] ? quot : rshift_round(lane_sum[dl_x], 30));
            clip = clip || clips(wide); m_wdata = sat32(wide);
        end
        default: ;
        endcase
    end

    // sticky over a token's run: cleared by a start (taken or refused), set by any clip until the next
    always @(posedge clk) begin
        if (clip) saturated <= 1'b1;
        if (rst || (state == S_IDLE && start)) saturated <= 1'b0;
    end

    // the execute stage's registers: running sums, extremes, the statistics of a layer_norm
    always @(posedge clk) begin
        case (state_x)
        S_FETCH: begin  // the issue stage runs the instruction's first step
            acc <= 0; sum <= 0;
            v_head <= 0; v_group <= 0; v_lane <= 0; v_comp <= 0;
        end
        S_LN_SUM: begin
            acc <= acc + m0;
            if (i_x == n - 1) begin mean <= quot; acc <= 0; end
        end
        S_LN_VAR: begin
            acc <= mac;
            if (i_x == n - 1) rr <= root < 1 ? 64'sd1 : root;
        end
        S_ATT_EXP: sum <= sum + exp_out;
        S_NF_EXP: begin  // sum is 0 from S_FETCH
            sum <= sum + exp_out;
            den <= sum + exp_out;
        end
        S_NF_EPS: den <= den + exp_out;
        default: ;
        endcase
        case (drain_x)
        S_LINEAR_DRAIN: if (flags[TO_VALUES]) begin  // row di + dl is component v_comp of head v_head
            if (v_comp == c - 1) begin v_comp <= 0; v_lane <= 0; v_group <= 0; v_head <= v_head + 1; end
            else if (v_lane == LANES - 1) begin v_comp <= v_comp + 1; v_lane <= 0; v_group <= v_group + 1; end
            else begin v_comp <= v_comp + 1; v_lane <= v_lane + 1; end
        end
        S_ATT_SCORE_DRAIN: begin
            if (di_x + dl_x == 0 || scaled_word > mx) mx <= scaled_word;
            sum <= 0;  // for the exps that follow
        end
        S_NF_DIST_DRAIN: if (di_x + dl_x == 0 || scaled_word < mn) mn <= scaled_word;
        default: ;
        endcase
    end
endmodule
