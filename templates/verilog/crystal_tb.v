// crystal_tb: runs crystal_core over a prompt and prints the last position's logits.
//
//   vvp sim.vvp +prompt=ids.hex +tokens=N     (run in this folder: the core reads rom.hex, program.hex)
//
// ids.hex holds N rows of the current vocabulary, one hex word a line. Prints
// "logit <row> <Q16.16 integer>" for every row, then "cycles <clock cycles>".
`include "model.vh"

module crystal_tb;
    reg clk = 1'b0, start = 1'b0;
    reg [31:0] token = 0, pos = 0, rd_addr = 0;
    wire done;
    wire [31:0] rd_data;
    crystal_core core (.clk(clk), .start(start), .token(token), .pos(pos), .done(done),
                       .rd_addr(rd_addr), .rd_data(rd_data));
    always #1 clk = ~clk;

    reg [31:0] ids [0:`N_CTX-1];
    reg [8*4096-1:0] prompt;
    integer count, p, v;
    reg [63:0] cycles = 0, total;
    always @(posedge clk) cycles <= cycles + 1;

    initial begin
        if (!$value$plusargs("prompt=%s", prompt) || !$value$plusargs("tokens=%d", count)
            || count < 1 || count > `N_CTX) begin
            $display("usage: vvp sim.vvp +prompt=FILE +tokens=N (1 <= N <= %0d)", `N_CTX);
            $finish;
        end
        $readmemh(prompt, ids, 0, count - 1);
        for (p = 0; p < count; p = p + 1) begin
            @(negedge clk) begin token = ids[p]; pos = p; start = 1'b1; end
            @(negedge clk) start = 1'b0;
            wait (done);
        end
        total = cycles;  // the prompt's clock cycles; the reading out below is the testbench's
        for (v = 0; v < `VOCAB_SIZE; v = v + 1) begin
            @(negedge clk) rd_addr = `LOGITS + v;
            @(negedge clk) $display("logit %0d %0d", v, $signed(rd_data));  // a clock after its address
        end
        $display("cycles %0d", total);
        $finish;
    end
endmodule
