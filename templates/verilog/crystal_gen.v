// crystal_gen: greedy generation around crystal_core, with the spec's window.
//
// Copied by crystalc, unchanged, for every model. The prompt (rows of the
// current vocabulary, at most N_CTX) is written into the token buffer while
// idle; `start` runs it through the core a position at a time, then generates
// n tokens: each is the first largest logit of the last position, given out
// with `tok_valid` for one clock, and appended, the window shifted first when
// it is full: the oldest `shift` tokens are dropped and the rest, with the new
// one, run again from position 0 (interpret.generate, the spec's "Generation
// past the window"). With n = 0 it runs the prompt only; either way, once
// `done` has risen, rd_addr reads the core's RAM (the last position's logits at
// LOGITS + i) a clock later, as the core's port does. `rst` (a clock, first)
// makes it and the core idle whatever they powered up as; `start` is taken while
// `busy` is low, and prompt_len, n and shift are read then, once. A prompt_len
// or shift outside 1..N_CTX (a shift of 0 would grow the window past the
// caches, one past N_CTX would count its move for 2^32 clocks), or a token the
// core refuses, ends the run: `done` with `error` high. With `done`, `saturated`
// is high when, since `start`, a value of one of the core's runs saturated
// (its `saturated`) or a logit the argmax read lies at Q16.16's bound: a tie at
// the bound is no longer the model's choice, so the tokens are not the model's.
`include "model.vh"

module crystal_gen (
    input  wire        clk,
    input  wire        rst,
    input  wire        start,
    input  wire [31:0] prompt_len,  // 1 .. N_CTX tokens in the buffer
    input  wire [31:0] n,           // tokens to generate
    input  wire [31:0] shift,       // 1 .. N_CTX
    input  wire        buf_we,      // while idle: buffer word buf_addr <= buf_data
    input  wire [31:0] buf_addr,
    input  wire [31:0] buf_data,
    output reg         tok_valid,
    output reg  [31:0] tok,
    output reg         done,
    output reg         error,  // the last run was refused: prompt_len, shift or a token out of range
    output reg         saturated,  // since start, a value reached Q16.16's bound (the outputs are not the model's)
    output wire        busy,
    input  wire [31:0] rd_addr,
    output wire [31:0] rd_data
);
    localparam [2:0] G_IDLE = 0, G_READ = 1, G_START = 2, G_WAIT = 3, G_ARGMAX = 4, G_EMIT = 5, G_SHIFT = 6;
    reg [2:0] state = G_IDLE;
    reg [31:0] len, p, made, v, best, q;  // tokens in the window, position run, tokens made, logit row, best row
    reg signed [31:0] top;                // the largest logit so far
    reg [31:0] n_run, shift_run;          // n and shift as they were at start
    assign busy = state != G_IDLE;

    reg [31:0] BUF [0:`N_CTX-1];  // the window's tokens, position order
    reg [31:0] bq;                 // BUF read a clock after its address
    /* verilator lint_off UNUSEDSIGNAL */  // addresses are 32 bits; the buffer uses what it needs
    reg [31:0] b_raddr, b_waddr;
    /* verilator lint_on UNUSEDSIGNAL */
    reg [31:0] b_wdata;
    reg b_we;
    always @(posedge clk) begin
        if (b_we) BUF[b_waddr] <= b_wdata;
        bq <= BUF[b_raddr];
    end

    reg core_start;
    wire core_done, core_error, core_saturated;
    reg [31:0] core_rd;
    /* verilator lint_off PINCONNECTEMPTY */  // the generator knows when the core is busy: it started it
    crystal_core core (.clk(clk), .rst(rst), .start(core_start), .token(bq), .pos(p), .done(core_done),
                       .error(core_error), .saturated(core_saturated), .busy(), .rd_addr(core_rd),
                       .rd_data(rd_data));
    /* verilator lint_on PINCONNECTEMPTY */

    // the addresses and the one buffer write of each state
    always @* begin
        b_raddr = p; b_we = 1'b0; b_waddr = 0; b_wdata = 0; core_rd = rd_addr;
        case (state)
        G_IDLE: begin b_we = buf_we; b_waddr = buf_addr; b_wdata = buf_data; end
        G_ARGMAX: core_rd = `LOGITS + v;
        G_EMIT: if (len != `N_CTX) begin b_we = 1'b1; b_waddr = len; b_wdata = best; end
                else b_raddr = shift_run;  // the first word the shift moves
        G_SHIFT: begin  // word q + shift, read last clock, moves to q; then the new token after them
            b_raddr = q + 1 + shift_run; b_we = 1'b1;
            b_waddr = q; b_wdata = q == `N_CTX - shift_run ? best : bq;
        end
        default: ;
        endcase
    end

    always @(posedge clk) begin
        done <= 1'b0; tok_valid <= 1'b0; core_start <= 1'b0;
        case (state)
        G_IDLE: if (start) begin
            saturated <= 1'b0;
            error <= prompt_len == 0 || prompt_len > `N_CTX || shift == 0 || shift > `N_CTX;
            if (prompt_len == 0 || prompt_len > `N_CTX || shift == 0 || shift > `N_CTX) done <= 1'b1;
            else begin len <= prompt_len; n_run <= n; shift_run <= shift; p <= 0; made <= 0; state <= G_READ; end
        end
        G_READ: state <= G_START;  // BUF[p] is read
        G_START: begin core_start <= 1'b1; state <= G_WAIT; end
        G_WAIT: if (core_done) begin
            if (core_saturated) saturated <= 1'b1;
            if (core_error) begin error <= 1'b1; done <= 1'b1; state <= G_IDLE; end
            else if (p + 1 < len) begin p <= p + 1; state <= G_READ; end
            else if (made == n_run) begin done <= 1'b1; state <= G_IDLE; end
            else begin v <= 0; state <= G_ARGMAX; end
        end
        // logit v is on rd_data a clock after its address: v - 1's is compared while v's is read
        G_ARGMAX: begin
            v <= v + 1;
            if (v == 1 || (v > 1 && $signed(rd_data) > top)) begin top <= $signed(rd_data); best <= v - 1; end
            // an exact logit at the bound is indistinguishable from a clipped one (the logits path refuses both)
            if (v != 0 && (rd_data == 32'h7fffffff || rd_data == 32'h80000000)) saturated <= 1'b1;
            if (v == `VOCAB_SIZE) state <= G_EMIT;
        end
        G_EMIT: begin
            tok_valid <= 1'b1; tok <= best; made <= made + 1;
            if (made + 1 == n_run) begin done <= 1'b1; state <= G_IDLE; end
            else if (len == `N_CTX) begin q <= 0; state <= G_SHIFT; end
            else begin p <= len; len <= len + 1; state <= G_READ; end
        end
        G_SHIFT: begin
            q <= q + 1;
            if (q == `N_CTX - shift_run) begin len <= `N_CTX - shift_run + 1; p <= 0; state <= G_READ; end
        end
        default: state <= G_IDLE;
        endcase
        // last, so it wins; done, tok_valid and the core's start fall every clock
        if (rst) begin state <= G_IDLE; error <= 1'b0; saturated <= 1'b0; end
    end
endmodule
