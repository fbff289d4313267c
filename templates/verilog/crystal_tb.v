// crystal_tb: runs a prompt through crystal_gen (and so crystal_core) and prints what it made.
//
//   vvp sim.vvp +prompt=ids.hex +tokens=N [+generate=G] [+shift=K] [+abort=A] [+max_cycles=C]
//       (run in this folder: the core reads rom.hex, lanes.hex, scales.hex, program.hex)
//
// +max_cycles=C: after C clocks, print "timeout <cycles>" and stop (a damaged program.hex can loop for
// 2^32 steps); crystalc passes twice what the run can take (verilog.cycle_bound).
//
// +abort=A: A clocks after the start, the host resets the design mid-run (rst for a clock), loads the
// prompt again and starts it again; what the first run made is not printed, and the cycles count both.
//
// ids.hex holds N rows of the current vocabulary (1 <= N <= N_CTX), one hex word
// a line. Without +generate, prints "logit <row> <Q16.16 integer>" for every row
// of the last position; with it, "token <row>" for each of G greedy tokens (the
// window shifted by K when full, 1 by default). Then "saturated <0|1>", 1 when a
// value of the run reached Q16.16's bound (crystal_gen's `saturated`: what was
// printed is then not the model's), and "cycles <clock cycles>", from time 0 to
// `done` (the prompt's loading included, the logits' reading not).
`include "model.vh"

module crystal_tb;
    reg clk = 1'b0, rst = 1'b1, start = 1'b0, buf_we = 1'b0;  // rst: the first clock edge only
    reg [31:0] prompt_len = 0, n = 0, shift = 1, buf_addr = 0, buf_data = 0, rd_addr = 0;
    wire tok_valid, done, error, saturated;
    wire [31:0] tok, rd_data;
    /* verilator lint_off PINCONNECTEMPTY */
    crystal_gen gen (.clk(clk), .rst(rst), .start(start), .prompt_len(prompt_len), .n(n), .shift(shift),
                     .buf_we(buf_we), .buf_addr(buf_addr), .buf_data(buf_data), .tok_valid(tok_valid), .tok(tok),
                     .done(done), .error(error), .saturated(saturated), .busy(), .rd_addr(rd_addr),
                     .rd_data(rd_data));
    /* verilator lint_on PINCONNECTEMPTY */
    always #1 clk = ~clk;

    reg [31:0] ids [0:`N_CTX-1];
    reg [8*4096-1:0] prompt;
    integer count, p, v, abort_at;
    reg quiet = 1'b0;  // the aborted run's tokens are not printed
    reg [63:0] cycles = 0, total, max_cycles = 0;
    always @(posedge clk) cycles <= cycles + 1;
    always @(posedge clk) if (max_cycles != 0 && cycles >= max_cycles) begin
        $display("timeout %0d", cycles);
        $finish;
    end
    always @(posedge clk) if (tok_valid && !quiet) $display("token %0d", tok);

    initial begin
        if (!$value$plusargs("prompt=%s", prompt) || !$value$plusargs("tokens=%d", count)
            || count < 1 || count > `N_CTX) begin
            $display("usage: vvp sim.vvp +prompt=FILE +tokens=N [+generate=G] [+shift=K] (1 <= N <= %0d)", `N_CTX);
            $finish;
        end
        if (!$value$plusargs("generate=%d", n)) n = 0;
        if (!$value$plusargs("shift=%d", shift)) shift = 1;
        if (!$value$plusargs("abort=%d", abort_at)) abort_at = 0;
        if (!$value$plusargs("max_cycles=%d", max_cycles)) max_cycles = 0;
        $readmemh(prompt, ids, 0, count - 1);
        for (p = 0; p < count; p = p + 1)
            @(negedge clk) begin rst = 1'b0; buf_we = 1'b1; buf_addr = p; buf_data = ids[p]; end
        @(negedge clk) begin buf_we = 1'b0; prompt_len = count; start = 1'b1; end
        @(negedge clk) start = 1'b0;
        if (abort_at > 0) begin
            quiet = 1'b1;
            repeat (abort_at) @(negedge clk);
            rst = 1'b1;
            @(negedge clk) rst = 1'b0;
            for (p = 0; p < count; p = p + 1)  // a shifted window rewrote the buffer: the prompt again
                @(negedge clk) begin buf_we = 1'b1; buf_addr = p; buf_data = ids[p]; end
            @(negedge clk) begin buf_we = 1'b0; quiet = 1'b0; start = 1'b1; end
            @(negedge clk) start = 1'b0;
        end
        wait (done);
        total = cycles;
        if (error) begin  // the host checks all this first; here the design's own refusal is what is seen
            $display("refused: a token, the prompt's length or the shift is out of range");
            $finish;
        end
        if (n != 0) begin @(posedge clk); @(negedge clk); end  // the last token, printed at the edge after done
        if (n == 0)
            for (v = 0; v < `VOCAB_SIZE; v = v + 1) begin
                @(negedge clk) rd_addr = `LOGITS + v;
                @(negedge clk) $display("logit %0d %0d", v, $signed(rd_data));  // a clock after its address
            end
        $display("saturated %0d", saturated);
        $display("cycles %0d", total);
        $finish;
    end
endmodule
