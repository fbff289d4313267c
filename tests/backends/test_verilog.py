"""The Verilog backend: Icarus simulates the core, which must equal the fixed-point emulator word for word.

The emulator (backends/fixedpoint.py) is held to the reference interpreter in
test_fixedpoint.py (tolerance and why there); here the simulated hardware is
held to the emulator exactly, and through it, to the interpreter within the same
tolerance; so are the greedy tokens crystal_gen generates around the core, and
every simulation's clock cycles to verilog.cycles_counted. Yosys maps the core
(and the generator) to an FPGA's cells, its memories to RAMs; the netlist it
makes of the design, written back as Verilog, simulates as the RTL does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crystalc.backends import fixedpoint as fp
from crystalc.backends import verilog
from crystalc.backends.verilog import (
    BACKEND,
    core_cycles,
    core_memories,
    cycle_bound,
    cycles_counted,
    lanes_hex,
    simulate_generate,
    synthesize,
)
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward, generate
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.backends.test_c import greedy_with_margin
from tests.backends.test_fixedpoint import TOL, far_field_graph, head_clipping_graph, saturating_graph
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool, save_pt

SIM_TIMEOUT = 300  # s: a core that never halts fails its test instead of hanging it (the longest here takes seconds)


def simulate(out: Path, ids: list[int], simulator: str = "icarus", generate: int = 0,
             shift: int = 1) -> tuple[np.ndarray, int]:
    return verilog.simulate(out, ids, simulator, SIM_TIMEOUT, generate, shift)


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("make", "iverilog", "vvp")


def built(graph: Graph, out: Path, lanes: int = 1) -> Path:
    out.mkdir(parents=True)
    BACKEND.emit(graph, out, lanes=lanes)
    BACKEND.build(out)
    return out


def check(graph: Graph, out: Path, ids: list[int], lanes: int = 1) -> None:
    got, cycles, saturated = verilog.run_simulation(out, ids, "icarus", SIM_TIMEOUT)
    want = fp.emulate_run(fp.lower(graph), ids)
    assert got.tolist() == want.logits.tolist()
    assert saturated is want.saturated is False  # in range; out of it, test_a_saturated_value_inside_the_network_...
    ref = forward(graph, ids)[-1]
    assert np.abs(fp.to_float(got) - ref).max() <= TOL * max(1.0, float(np.abs(ref).max()))
    assert cycles == cycles_counted(fp.lower(graph), lanes, len(ids))


@pytest.mark.tool
@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_simulation_equals_the_emulator(shape, tmp_path):
    g = random_graph(shape, seed=2)
    out = built(g, tmp_path / shape)
    rng = np.random.default_rng(7)
    check(g, out, rng.integers(0, g.config.vocab_size, g.config.n_ctx).tolist())  # the whole window
    check(g, out, [int(rng.integers(0, g.config.vocab_size))])


@pytest.mark.tool
def test_far_neurons_with_large_temperatures(tmp_path):
    # the field's coefficients are Q8.24, not Q16.16: the core shifts their products by 24, the emulator too
    far = far_field_graph(3)
    check(far, built(far, tmp_path / "out", lanes=3), [1, 2, 3, 4, 5, 6], lanes=3)


@pytest.mark.tool
def test_a_saturated_logit_is_refused_not_printed(tmp_path):
    # found by an audit: logits past +-32768 were printed as 32768, tied, and the hardware's argmax picked
    # another token than the model's; the core saturates, so its logits are refused, naming the id
    g = random_graph(dict(vocab_size=6, d_model=4, n_ctx=3, n_heads=1, n_blocks=1, n_neurons=1, ffn_hidden=4,
                          final_norm=True), seed=0)
    head = g.head.weight
    g = g.map_tensors(lambda t: type(t)(t.name, (np.sign(t.data) * 20000).astype(np.float32)) if t is head else t)
    assert np.abs(forward(g, [1, 2])[-1]).max() > 32768
    out = built(g, tmp_path / "out")
    with pytest.raises(CrystalError, match=r"^the logit of id \d reached Q16.16's bound"):
        verilog.simulate_logits(out, [1, 2])


def emulated_generation(g: Graph, ids: list[int], n: int, shift: int) -> tuple[list[int], bool]:
    """The emulator's greedy tokens, and crystal_gen's saturation flag as the emulator sees it: a value of a
    run saturated, or a logit the argmax read lies at the bound."""
    prog = fp.lower(g)
    flags = []

    def logits_of(ctx: list[int]) -> np.ndarray:
        run = fp.emulate_run(prog, ctx)
        flags.append(run.saturated or bool(fp.at_bound(run.logits).any()))
        return run.logits

    return generate(g, ids, n, shift, logits_of=logits_of), any(flags)


@pytest.mark.tool
def test_a_saturated_value_inside_the_network_is_refused(tmp_path):
    # found by an audit: x = 40000 in the residual stream saturated at 32768 and the logits, in range, came out
    # 0.18 off the model's without a word; the core says a saturation acted, as the emulator does
    g = saturating_graph()
    out = built(g, tmp_path / "out", lanes=2)
    got, _, saturated = verilog.run_simulation(out, [1, 2], "icarus", SIM_TIMEOUT)
    want = fp.emulate_run(fp.lower(g), [1, 2])
    assert got.tolist() == want.logits.tolist() and saturated is want.saturated is True
    assert not fp.at_bound(got).any()
    said = r"^a value reached Q16.16's bound \(\+-32768\) in the simulation, where the hardware saturates: .* the {}"
    with pytest.raises(CrystalError, match=said.format("logits")):
        simulate(out, [1, 2])
    with pytest.raises(CrystalError, match=said.format("logits")):
        verilog.simulate_logits(out, [1, 2])
    with pytest.raises(CrystalError, match=said.format("tokens")):
        simulate(out, [1, 2], generate=3)
    assert emulated_generation(g, [1, 2], 3, 1)[1]
    res = cli("simulate", str(out), "--prompt-ids", "1,2", "-n", "3")
    assert res.returncode == 2 and res.stdout == "" and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.tool
def test_an_unread_logit_s_clip_is_no_saturation(tmp_path):
    # found by a review: the core flagged position 0's clipped logit, which nothing reads
    g = head_clipping_graph()
    out = built(g, tmp_path / "out")
    got, _, saturated = verilog.run_simulation(out, [1, 2], "icarus", SIM_TIMEOUT)
    assert got.tolist() == fp.emulate_run(fp.lower(g), [1, 2]).logits.tolist() and not saturated
    assert simulate(out, [1, 2])[0].tolist() == got.tolist()
    with pytest.raises(CrystalError, match="the logits are not the model's"):  # read, it is refused
        simulate(out, [1])


@pytest.mark.tool
def test_generation_from_saturated_logits_is_refused(tmp_path):
    # found by an audit: `simulate -n` took the argmax of logits saturated at 32768 (tied, the first won)
    # where the logits path refuses them; a logit exactly at the bound, no saturation having acted, is as
    # ambiguous, so crystal_gen flags both
    from crystalc.ir.tensor import Tensor

    cfg = dict(vocab_size=6, d_model=4, n_ctx=3, n_heads=1, n_blocks=1, n_neurons=1, ffn_hidden=4, final_norm=True)
    g = random_graph(cfg, seed=0)
    head = g.head.weight
    clipped = g.map_tensors(lambda t: Tensor(t.name, (np.sign(t.data) * 20000).astype(np.float32)) if t is head else t)
    assert np.abs(forward(clipped, [1, 2])[-1]).max() > 32768
    out = built(clipped, tmp_path / "clipped")
    with pytest.raises(CrystalError, match=r"^a value reached Q16.16's bound .* the tokens are not the model's$"):
        simulate(out, [1, 2], generate=3)
    assert emulated_generation(clipped, [1, 2], 3, 1)[1]

    # h = ln_f's bias (its weight 0), 2 - 2^-16 in component 0; row 0 of the head 16384 there and a bias of
    # 16383 / 2^16: logit 0 = 2^14 (2^17 - 1) + 16383 = 2^31 - 1 exactly, nothing saturated on the way
    exact = {"ln_f.weight": np.zeros(4), "ln_f.bias": np.array([2 - 2**-16, 0, 0, 0]),
             "head.weight": np.zeros((6, 4)), "head.bias": np.array([16383 / 2**16, 0, 0, 0, 0, 0])}
    exact["head.weight"][0, 0] = 16384
    g = g.map_tensors(lambda t: Tensor(t.name, exact[t.name].astype(np.float32)) if t.name in exact else t)
    run = fp.emulate_run(fp.lower(g), [1, 2])
    assert run.logits[0] == fp.INT32_MAX and not run.saturated
    out = built(g, tmp_path / "exact")
    assert verilog.run_simulation(out, [1, 2], "icarus", SIM_TIMEOUT)[2] is False  # the core's flag alone: no
    made, _, saturated = verilog.run_simulation(out, [1, 2], "icarus", SIM_TIMEOUT, generate=3)
    assert (made.tolist(), saturated) == emulated_generation(g, [1, 2], 3, 1) == ([0, 0, 0], True)
    with pytest.raises(CrystalError, match=r"^a value reached Q16.16's bound .* the tokens are not the model's$"):
        simulate_generate(out, [1, 2], 3)


@pytest.mark.tool
def test_an_attention_numerator_of_minus_2_63_is_divided_as_the_core_does(tmp_path):
    # found by an audit: the emulator's division took |INT64_MIN|, which overflows, and its attention output
    # was +32768 where the core's 65-bit divider gives -32768. D = 1: h = ln1's bias, 1; q = 0, so every
    # score is 0 and every e_j 2^30; v = -16384 h - 16384 = -32768 exactly (-2^31, nothing saturated), so
    # the fourth position's numerator is 4 x 2^30 x -2^31 = -2^63
    from crystalc.ir.tensor import Tensor

    cfg = dict(vocab_size=3, d_model=1, n_ctx=4, n_heads=1, n_blocks=1, n_neurons=0, ffn_hidden=1)
    planted = {"blocks.0.ln1.weight": 1.0, "blocks.0.ln1.bias": 1.0, "blocks.0.attn.q_proj.weight": 0.0,
               "blocks.0.attn.q_proj.bias": 0.0, "blocks.0.attn.v_proj.weight": -16384.0,
               "blocks.0.attn.v_proj.bias": -16384.0, "blocks.0.attn.out_proj.weight": 2**-10,
               "blocks.0.attn.out_proj.bias": 0.0}
    g = random_graph(cfg, seed=0).map_tensors(
        lambda t: Tensor(t.name, np.full_like(t.data, planted[t.name])) if t.name in planted else t)
    check(g, built(g, tmp_path / "out"), [0, 1, 2, 0])


def test_token_cycles_bound_every_position_not_only_the_last(tmp_path):
    # found by an audit: TOKEN_CYCLES was the last position's cycles, but a position's are not monotone (the
    # attention's output pass drains beside its steps once the positions reach the lanes): here position 6
    # takes 18 more than 7, and cycle_bound, which prices each position at TOKEN_CYCLES, fell below a run's
    g = random_graph(dict(vocab_size=3, d_model=32, n_ctx=8, n_heads=1, n_blocks=1, n_neurons=1, ffn_hidden=2),
                     seed=0)
    BACKEND.emit(g, tmp_path, lanes=8)
    prog = fp.lower(g)
    per = [sum(core_cycles(prog, 8, pos).values()) for pos in range(8)]
    assert per[-1] < max(per)
    sizes = verilog._defines(tmp_path)
    assert sizes["TOKEN_CYCLES"] == max(per) + 4
    for prompt in range(1, 9):
        for n, shift in ((0, 1), (1, 1), (6, 3), (20, 1), (20, 8)):
            assert cycles_counted(prog, 8, prompt, n, shift) <= cycle_bound(sizes, prompt, n)
    assert f"position {per.index(max(per))}: {max(per)} =" in (tmp_path / "model.vh").read_text()


@pytest.mark.tool
def test_a_folder_emitted_again_is_simulated_afresh(tmp_path):
    # found by an audit: a simulation built for one model ran the next one emitted into its folder (the
    # library's emit, which the command line never does), and said "undefined values (x)"
    out = built(random_graph(dict(vocab_size=9, d_model=4, n_ctx=4, n_heads=1, n_blocks=1, n_neurons=1,
                                  ffn_hidden=3), seed=1), tmp_path / "out")
    g = random_graph(dict(vocab_size=5, d_model=6, n_ctx=4, n_heads=2, n_blocks=1, n_neurons=2, ffn_hidden=3), seed=1)
    BACKEND.emit(g, out)
    got, _ = verilog.simulate_logits(out, [1, 2])
    assert [round(v * fp.ONE) for _, v in got] == fp.emulate(fp.lower(g), [1, 2]).tolist()


@pytest.mark.tool
def test_a_built_folder_runs_where_only_vvp_is(tmp_path, monkeypatch):
    # an audit's find: simulating asked for iverilog even when sim.vvp was built and up to date
    g = random_graph(dict(vocab_size=5, d_model=3, n_ctx=4, n_heads=1, n_blocks=1, n_neurons=1, ffn_hidden=2), seed=3)
    out = built(g, tmp_path / "out")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("make", "vvp"):
        (tools / name).symlink_to(shutil.which(name))
    monkeypatch.setenv("PATH", str(tools))
    got, _ = verilog.simulate_logits(out, [1, 2])
    assert [round(v * fp.ONE) for _, v in got] == fp.emulate(fp.lower(g), [1, 2]).tolist()
    later = (out / verilog.SIM).stat().st_mtime + 10  # a source newer than sim.vvp: building again needs iverilog
    os.utime(out / "crystal_core.v", (later, later))
    with pytest.raises(CrystalError, match="needs 'iverilog', which is not on PATH"):
        verilog.simulate_logits(out, [1, 2])


@pytest.mark.tool
def test_a_program_that_never_halts_is_stopped_and_named(tmp_path):
    # found by an audit: a neuron_field of width 0 in a well-formed program.hex made the core count 2^32 steps,
    # and the simulation hung; the testbench stops at twice what the run can take (model.vh's TOKEN_CYCLES)
    g = random_graph("d40_h5", seed=3)
    out = built(g, tmp_path / "out")
    got, cycles = simulate(out, [1, 2, 3], generate=4)
    assert cycles <= verilog.cycle_bound(verilog._defines(out), 3, 4)  # the bound holds for a real run
    instrs = [dataclasses.replace(i, n=0) if i.op == "neuron_field" else i
              for i in core_memories(fp.lower(g), 1).instrs]
    (out / "program.hex").write_text(verilog.program_hex(instrs))
    with pytest.raises(CrystalError, match=r"^the simulation ran past \d+ clock cycles, .*program.hex is damaged"):
        simulate(out, [1, 2, 3])


@pytest.mark.tool
def test_quantized_pruned_graph(tmp_path):
    full = random_graph("tied_unnormalised", seed=8)
    keep = [0, 1, 4, 5, 9, 10, 17, 30]
    g = quantize(prune_vocab(full, None, keep), "mixed8", "row")
    out = built(g, tmp_path / "out")
    assert (out / "vocab_map.txt").read_text().split() == [str(i) for i in keep]
    check(g, out, [0, 3, 7, 2, 5])


@pytest.mark.tool
@pytest.mark.parametrize("shape,mode,granularity,lanes", [
    ("d40_h5", "int8", "tensor", 3),  # one multiplier and an offset a tensor; the head's codes too
    ("tied_unnormalised", "mixed8", "row", 4),  # the field's values: a multiplier a neuron, every pass
    ("three_blocks_n0_n1", "int16", "group:5", 1),  # two codes a word; a multiplier every 5 steps
    ("three_blocks_n0_n1", "int8", "row", 8),  # a field of 1 neuron, none; more lanes than rows
    ("tied_unnormalised", "int8", "group:3", 3),
])
def test_quantized_graphs_run_on_their_codes(shape, mode, granularity, lanes, tmp_path):
    g = quantize(random_graph(shape, seed=15), mode, granularity)
    out = built(g, tmp_path / "out", lanes)
    assert "codes, " in (out / "model.vh").read_text()  # the lane ROM holds codes
    check(g, out, np.random.default_rng(4).integers(0, g.config.vocab_size, g.config.n_ctx).tolist(), lanes)


@pytest.mark.tool
@pytest.mark.parametrize("shape,lanes,prompt,n,shift,quant", [
    ("d40_h5", 3, 4, 20, 3, None),  # window 9: the prompt grows it to full, then shifts of 3
    ("tied_unnormalised", 1, 8, 6, 1, ("mixed8", "row")),  # a full window at once: every token shifts by 1
    ("three_blocks_n0_n1", 4, 2, 9, 7, None),  # a shift of the whole window: the new token alone
])
def test_the_hardware_generates_as_the_emulator(shape, lanes, prompt, n, shift, quant, tmp_path):
    # crystal_gen: greedy tokens (the first largest Q16 logit) with the spec's window, exactly the
    # emulator's; and the interpreter's wherever its top two logits are further apart than the
    # emulator's error can reach (test_fixedpoint.TOL)
    g = random_graph(shape, seed=16)
    g = g if quant is None else quantize(g, *quant)
    out = built(g, tmp_path / "out", lanes)
    ids = np.random.default_rng(5).integers(0, g.config.vocab_size, prompt).tolist()
    prog = fp.lower(g)
    got, cycles, saturated = verilog.run_simulation(out, ids, "icarus", SIM_TIMEOUT, generate=n, shift=shift)
    assert (got.tolist(), saturated) == emulated_generation(g, ids, n, shift)
    assert not saturated
    assert cycles == cycles_counted(prog, lanes, prompt, n, shift)
    want, margin = greedy_with_margin(g, ids, n, shift)
    assert margin > 4 * TOL * max(1.0, float(np.abs(forward(g, ids)).max()))  # measured 4.7x to 44x of it
    assert got.tolist() == want


@pytest.mark.tool
def test_a_changed_rom_word_changes_the_logits(tmp_path):
    # the comparison above is not vacuous: the simulation reads its weights from rom.hex
    g = random_graph("all_on", seed=3)
    out = built(g, tmp_path / "out")
    prog = fp.lower(g)
    mem = core_memories(prog, 1)
    want = fp.emulate(prog, [1, 2])

    def changed(name: str, base: int, word: str) -> np.ndarray:
        original = (out / name).read_text()
        lines = original.splitlines()
        words = [i for i, line in enumerate(lines) if not line.startswith("//")]
        lines[words[base]] = word
        (out / name).write_text("\n".join(lines) + "\n")
        got, _ = simulate(out, [1, 2])
        (out / name).write_text(original)
        return got - want

    bias = next(b for w, b, _ in mem.rom_table if w == "head.bias")
    diff = changed("rom.hex", bias + 4, f"{(int(mem.rom[bias + 4]) + fp.ONE) & 0xFFFFFFFF:08x}")
    assert diff.tolist() == [fp.ONE if i == 4 else 0 for i in range(len(want))]
    # the head's weight (tied: token_embed's rows in the lane ROM), row 4, column 0 (one lane: word
    # 4 D past the head's base); the head's input at 0 is not 0, so logit 4 moves, and only it
    head = [ins for ins in mem.instrs if ins.op == "linear"][-1]
    diff = changed("lanes.hex", head.a + 4 * g.config.d_model, f"{fp.ONE * 3:08x}")
    assert diff[4] != 0 and not np.delete(diff, 4).any()


# drives crystal_gen through runs with one input out of range each, then a good run: the host refuses all
# of these first, so this testbench is the only place the design's own refusal is seen
REFUSAL_TB = """`include "model.vh"
module refusal_tb;
    reg clk = 1'b0, rst = 1'b1, start = 1'b0, we = 1'b0;
    reg [31:0] len = 1, n = 0, shift = 1, data = 0;
    wire tok_valid, done, error, busy;
    wire [31:0] tok, rd_data;
    crystal_gen gen (.clk(clk), .rst(rst), .start(start), .prompt_len(len), .n(n), .shift(shift), .buf_we(we),
                     .buf_addr(32'd0), .buf_data(data), .tok_valid(tok_valid), .tok(tok), .done(done),
                     .error(error), .busy(busy), .rd_addr(32'd0), .rd_data(rd_data));
    // the core alone, for the position the generator never gives it out of range
    reg c_start = 1'b0;
    reg [31:0] c_token = 0, c_pos = 0;
    wire c_done, c_error, c_busy;
    wire [31:0] c_rd;
    crystal_core core (.clk(clk), .rst(rst), .start(c_start), .token(c_token), .pos(c_pos), .done(c_done),
                       .error(c_error), .busy(c_busy), .rd_addr(32'd0), .rd_data(c_rd));
    always #1 clk = ~clk;
    reg [63:0] cycles = 0, began;
    always @(posedge clk) cycles <= cycles + 1;
    task run(input [31:0] l, input [31:0] nn, input [31:0] sh, input [31:0] t0);
        begin
            @(negedge clk) begin rst = 1'b0; we = 1'b1; data = t0; end
            @(negedge clk) begin we = 1'b0; len = l; n = nn; shift = sh; start = 1'b1; began = cycles; end
            @(negedge clk) start = 1'b0;
            wait (done);
            $display("run %0d %0d %0d %0d: error %0d after %0d clocks", l, nn, sh, t0, error, cycles - began);
            @(negedge clk);
        end
    endtask
    task core_run(input [31:0] t0, input [31:0] p0);
        begin
            @(negedge clk) begin c_token = t0; c_pos = p0; c_start = 1'b1; began = cycles; end
            @(negedge clk) c_start = 1'b0;
            wait (c_done);
            $display("core %0d %0d: error %0d after %0d clocks", t0, p0, c_error, cycles - began);
            @(negedge clk);
        end
    endtask
    initial begin
        run(1, 0, 1, 0);
        run(0, 0, 1, 0);
        run(`N_CTX + 1, 0, 1, 0);
        run(1, 2, 0, 0);
        run(1, 2, `N_CTX + 1, 0);
        run(1, 0, 1, `VOCAB_SIZE);
        run(1, 0, 1, 32'hffffffff);
        run(1, 1, 1, 0);
        core_run(0, `N_CTX);
        core_run(`VOCAB_SIZE, 0);
        core_run(0, 0);
        $finish;
    end
endmodule
"""


@pytest.mark.tool
def test_the_design_refuses_inputs_out_of_range(tmp_path):
    # a token past the vocabulary read other tensors' words, a shift of 0 grew the window past the caches and
    # one past N_CTX counted its move for 2^32 clocks: each run ends at once, `error` high; good runs after
    g = random_graph("d40_h5", seed=5)
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(g, out)
    (out / "refusal_tb.v").write_text(REFUSAL_TB)
    subprocess.run(["iverilog", "-g2005", "-o", "refusal.vvp", "refusal_tb.v", "crystal_gen.v", "crystal_core.v"],
                   cwd=out, check=True, capture_output=True, timeout=SIM_TIMEOUT)
    res = subprocess.run(["vvp", "-n", "refusal.vvp"], cwd=out, capture_output=True, text=True, timeout=SIM_TIMEOUT)
    runs = re.findall(r"^run (\d+) (\d+) (\d+) (\d+): error (\d+) after (\d+) clocks$", res.stdout, re.MULTILINE)
    assert len(runs) == 8, res.stdout
    v, t = g.config.vocab_size, g.config.n_ctx
    assert [(int(r[0]), int(r[1]), int(r[2]), int(r[3]), int(r[4])) for r in runs] == [
        (1, 0, 1, 0, 0), (0, 0, 1, 0, 1), (t + 1, 0, 1, 0, 1), (1, 2, 0, 0, 1), (1, 2, t + 1, 0, 1),
        (1, 0, 1, v, 1), (1, 0, 1, 2**32 - 1, 1), (1, 1, 1, 0, 0)]
    clocks = [int(r[5]) for r in runs]
    assert max(clocks[1:5]) <= 2  # refused at the start, by the generator
    assert max(clocks[5:7]) <= 8  # by the core, on the first position
    assert clocks[0] > 100 and clocks[7] > clocks[0]  # good runs compute, before and after the refusals
    core = re.findall(r"^core (\d+) (\d+): error (\d+) after (\d+) clocks$", res.stdout, re.MULTILINE)
    assert [(int(a), int(b), int(e)) for a, b, e, _ in core] == [(0, t, 1), (v, 0, 1), (0, 0, 0)], res.stdout
    assert max(int(c[3]) for c in core[:2]) <= 2 and int(core[2][3]) > 100


def encoding_defines(out: Path) -> dict[str, int]:
    """model.vh's defines of the program's encoding (verilog.encoding)."""
    text = (out / "model.vh").read_text()
    return {name: int(v) for name, v in re.findall(r"^`define ((?:FIELD|OP|FLAG)_\w+) (\d+)$", text, re.MULTILINE)}


@pytest.mark.tool
def test_the_core_decodes_the_program_as_python_encodes_it(tmp_path, monkeypatch):
    # The core reads fields, opcodes and flag bits by model.vh's names, which crystalc writes from the
    # constants it encodes program.hex with. Move every field, renumber every opcode (outside 0..6) and
    # put every flag on another bit: the simulation must still be the emulator's, word for word. A core
    # with a number of its own, or a define not made from the constant in use, would misread the program.
    g = random_graph("all_on", seed=3)  # every op, residuals, the caches, a normalised field with an eps term
    ids = [1, 2, 3]
    want = fp.emulate(fp.lower(g), ids).tolist()
    before = tmp_path / "before"
    before.mkdir()
    BACKEND.emit(g, before)
    monkeypatch.setattr(fp, "FIELDS", fp.FIELDS[5:] + fp.FIELDS[:5])
    monkeypatch.setattr(fp, "OPCODES", {op: 100 + (code + 3) % len(fp.OPCODES) for op, code in fp.OPCODES.items()})
    for name, bit in (("ACCUMULATE", 3), ("PER_POSITION", 0), ("TO_KEYS", 5), ("TO_VALUES", 1), ("NORMALIZE", 2),
                      ("HAS_EPS", 4)):
        monkeypatch.setattr(fp, name, 1 << bit)
    prog = fp.lower(g)
    assert {ins.op for ins in prog.instrs} == set(fp.OPCODES)
    flags = {ins.op: ins.flags for ins in core_memories(prog, 1).instrs if ins.flags}
    assert flags["neuron_field"] == fp.NORMALIZE | fp.HAS_EPS
    assert fp.emulate(prog, ids).tolist() == want  # the encoding is not the arithmetic
    after = built(g, tmp_path / "after")
    old, new = encoding_defines(before), encoding_defines(after)
    assert sorted(old) == sorted(new) and all(old[name] != new[name] for name in old), new
    assert (before / "program.hex").read_text() != (after / "program.hex").read_text()
    got, cycles = simulate(after, ids)
    assert got.tolist() == want
    assert cycles == cycles_counted(prog, 1, len(ids))


def test_the_core_names_every_field_opcode_and_flag_python_encodes(tmp_path):
    # the other way a new constant could go unseen: a field or an opcode Python adds that the core never
    # reads would compile, and the core would misread or halt on it; one the core reads that Python does
    # not define fails to compile
    BACKEND.emit(random_graph("all_on", seed=3), tmp_path)
    core = (tmp_path / "crystal_core.v").read_text()
    assert set(re.findall(r"`((?:FIELD|OP|FLAG)_\w+)", core)) == set(encoding_defines(tmp_path))
    enc = verilog.encoding()
    assert [name for name, _ in enc.fields] == [f"FIELD_{f.upper()}" for f in fp.FIELDS]
    assert {name for name, _ in enc.opcodes} == {f"OP_{op.upper()}" for op in fp.OPCODES}


@pytest.mark.parametrize("module,name,value,says", [
    (fp, "HAS_EPS", 3, "not a single bit"),  # the core tests one bit a flag
    (fp, "ACCUMULATE", 0, "not a single bit"),
    (fp, "TO_VALUES", 1 << 32, "not a single bit"),  # past the 32-bit field
    (fp, "HAS_EPS", fp.NORMALIZE, "share a bit"),
    (fp, "TO_KEYS", fp.PER_POSITION, "share a bit"),
    (fp, "OPCODES", {**fp.OPCODES, "gelu": 1}, "not distinct"),
])
def test_an_encoding_the_core_cannot_decode_is_refused(module, name, value, says, monkeypatch, tmp_path):
    monkeypatch.setattr(module, name, value)
    with pytest.raises(CrystalError, match=says):
        BACKEND.emit(random_graph("all_on", seed=3), tmp_path)


def test_broken_core_memories_are_refused():
    # core_memories verifies what it lays out (CoreMemories.verify): the core would read x or write nowhere
    mem = core_memories(fp.lower(quantize(random_graph("all_on", seed=3), "int8", "row")), 3)
    mem.verify()

    def first(pick) -> int:
        return next(i for i, ins in enumerate(mem.instrs) if pick(ins))

    coded, gelu = first(lambda ins: ins.op == "linear" and ins.qa), first(lambda ins: ins.op == "gelu")
    values, att = first(lambda ins: ins.flags & fp.TO_VALUES), first(lambda ins: ins.op == "causal_attention")

    def changed(i: int, **fields) -> list:
        return [dataclasses.replace(ins, **fields) if j == i else ins for j, ins in enumerate(mem.instrs)]

    for broken, says in (
        (dataclasses.replace(mem, instrs=mem.instrs[:-1]), "does not end in halt"),
        (dataclasses.replace(mem, instrs=changed(0, n=1 << 31)), "does not fit 32 bits"),
        (dataclasses.replace(mem, rom_table=mem.rom_table[1:]), "ROM entry"),
        (dataclasses.replace(mem, lane_rom=mem.lane_rom[:-1]), "lane ROM table covers"),
        (dataclasses.replace(mem, lane_scales=mem.lane_scales[:, :2]), "same lanes"),
        (dataclasses.replace(mem, key_groups=mem.key_groups + 1), "key groups"),
        (dataclasses.replace(mem, key_words=mem.key_words + 1), "key cache table covers"),
        (dataclasses.replace(mem, cache_table=mem.cache_table[1:] + mem.cache_table[:1]), "key cache"),
        (dataclasses.replace(mem, rom=mem.rom + (1 << 32)), "ROM word does not fit"),
        (dataclasses.replace(mem, logits=mem.ram_words), "logits at"),
        (dataclasses.replace(mem, instrs=changed(gelu, dst=mem.ram_words - 1)), "outside the RAM"),
        (dataclasses.replace(mem, instrs=changed(coded, b=mem.instrs[coded].b + 1)), "bias at"),
        (dataclasses.replace(mem, instrs=changed(coded, sa=mem.instrs[coded].sa + 1)), "multipliers at"),
        (dataclasses.replace(mem, instrs=changed(values, k=mem.instrs[values].k + 1)), "read as"),
        (dataclasses.replace(mem, instrs=changed(values, flags=mem.instrs[values].flags | fp.TO_KEYS)), "both caches"),
        (dataclasses.replace(mem, instrs=changed(att, a=mem.instrs[att].a + 1)), "keys at"),
    ):
        with pytest.raises(CrystalError, match=says):
            broken.verify()


def test_emit_is_deterministic_and_the_rom_is_the_program(tmp_path):
    g = random_graph("three_blocks_n0_n1", seed=4)
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        out.mkdir()
        BACKEND.emit(g, out)
    names = sorted(p.name for p in a.iterdir())
    assert names == ["Makefile", "crystal_core.v", "crystal_gen.v", "crystal_tb.v", "exp2.hex", "gelu.hex",
                     "lanes.hex", "model.vh", "program.hex", "rom.hex", "scales.hex"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    prog = fp.lower(g)

    def words(name: str) -> list[int]:
        return [int(w, 16) for line in (a / name).read_text().splitlines() if not line.startswith("//")
                for w in line.split()]

    mem = core_memories(prog, 1)
    assert words("rom.hex") == [int(w) & 0xFFFFFFFF for w in mem.rom]
    assert words("lanes.hex") == [int(w) & 0xFFFFFFFF for w in mem.lane_rom[:, 0]]
    assert words("exp2.hex") == fp.EXP_TABLE.tolist() and len(fp.EXP_TABLE) == 257
    assert words("gelu.hex") == [int(w) & 0xFFFFFFFF for w in fp.GELU_TABLE] and len(fp.GELU_TABLE) == 1025
    vh = (a / "model.vh").read_text()
    assert f"`define ROM_WORDS {mem.rom.size}" in vh and f"`define LOGITS {mem.logits}" in vh
    assert "blocks.2.field: 5 neurons" in vh  # the listing names each instruction's op


def read_as_the_core(mem, base: int, q: int, sb: int, per_pass: int, steps: int, offset: int, rows: int,
                     cols: int) -> np.ndarray:
    """The [rows, cols] words the lanes get of a tensor at lane ROM word `base`, read as crystal_core reads it:
    a pass a group of rows, a step a column; coded (q = 1, 2): 2^q codes a word, made words with the lane
    scale ROM's multiplier (pointer sb, per_pass words a pass, a word every `steps` steps) and the offset."""
    lanes = mem.lane_rom.shape[1]
    per = 1 << q
    span = -(-cols // per)
    got = np.zeros((rows, cols), dtype=np.int64)
    for r in range(rows):
        p, g = divmod(r, lanes)
        for j in range(cols):
            word = int(mem.lane_rom[base + p * span + j // per, g]) & 0xFFFFFFFF
            if q == 0:
                got[r, j] = word - (1 << 32) * (word >> 31)
                continue
            bits = 32 // per
            code = (word >> (bits * (j % per))) & ((1 << bits) - 1)
            code -= (1 << bits) * (code >> (bits - 1))
            mult = int(mem.lane_scales[sb + p * per_pass + j // steps, g])
            got[r, j] = fp.rshift_round(code * mult, 16) + offset
    return got


@pytest.mark.parametrize("mode,granularity", [(None, None), ("int8", "tensor"), ("mixed8", "row"), ("int16", "group:5"),
                                              ("int8", "group:2")])
@pytest.mark.parametrize("lanes", [1, 3, 8])
def test_core_memories_put_each_weight_where_its_lane_reads_it(lanes, mode, granularity):
    g = random_graph("tied_unnormalised", seed=5)  # a tied head, an unnormalised field, widths 3 does not divide
    g = g if mode is None else quantize(g, mode, granularity)
    prog = fp.lower(g)
    mem = core_memories(prog, lanes)
    assert mem.lane_rom.shape[1] == lanes and mem.lane_scales.shape[1] == lanes
    by_base = {b: w for w, b, _ in prog.rom_table}
    size = {b: n for _, b, n in prog.rom_table}

    def single(base_flat: int, base: int) -> None:  # the whole tensor, the same words, in the single-word ROM
        n = size[base_flat]
        assert mem.rom[base:base + n].tolist() == prog.rom[base_flat:base_flat + n].tolist()

    def lanes_read(ins: fp.Instr, slot: str, base_flat: int, rows: int, cols: int, transposed: bool = False) -> int:
        """Check the words the lanes get of a tensor; returns its packing (0: words)."""
        full = prog.rom[base_flat:base_flat + rows * cols].reshape(rows, cols)
        full = full.T if transposed else full
        base = getattr(ins, slot)
        q, sb, per_pass, steps, offset = (getattr(ins, f + slot) for f in "qspgo")
        got = read_as_the_core(mem, base, q, sb, per_pass, steps, offset, *full.shape)
        assert got.tolist() == full.tolist(), by_base[base_flat]
        pad = -full.shape[0] % lanes
        if q == 0 and pad:  # a short group's missing rows are zeros
            last = mem.lane_rom[base + (full.shape[0] // lanes) * full.shape[1]:][:full.shape[1]]
            assert not last[:, lanes - pad:].any()
        return q

    coded = 0
    for flat, ins in zip(prog.instrs, mem.instrs, strict=True):
        assert (flat.op, flat.n, flat.m) == (ins.op, ins.n, ins.m)
        if ins.op in ("token_embedding", "layer_norm"):
            single(flat.a, ins.a)
            single(flat.b, ins.b)
        elif ins.op == "linear":
            single(flat.b, ins.b)
            coded += lanes_read(ins, "a", flat.a, flat.n, flat.m) != 0
        elif ins.op == "neuron_field":
            single(flat.c, ins.c)
            coded += lanes_read(ins, "a", flat.a, flat.m, flat.n) != 0
            coded += lanes_read(ins, "b", flat.b, flat.m, flat.n, transposed=True) != 0
    # codes wherever they and their multipliers take fewer words than words would: all 17 lane tensors
    # (2 blocks of 6 linear layers and a field's positions and values, and the head) under int8 per
    # tensor; not mixed8's head (tied to the float32 embedding); not the fields' values under group
    # scales (a multiplier a code)
    assert coded == {None: 0, "tensor": 17, "row": 16, "group": 15}[granularity and granularity.split(":")[0]]
    # the key and value caches leave the RAM for memories of their own, positions (keys) or a head's
    # components (values) side by side; the simulations hold their use to the emulator word for word
    c = g.config
    assert mem.ram_words == prog.ram_words - sum(n for what, _, n in prog.ram_table if "cache" in what)
    assert mem.key_groups == -(-c.n_ctx // lanes)
    assert mem.key_words == c.n_blocks * c.d_model * mem.key_groups
    assert mem.value_words == c.n_blocks * c.n_heads * -(-(c.d_model // c.n_heads) // lanes) * c.n_ctx
    text = lanes_hex(mem).splitlines()
    rows = [line for line in text if not line.startswith("//")]
    assert len(rows) == len(mem.lane_rom) and all(len(r) == 8 * lanes for r in rows)
    assert int(rows[0][-8:], 16) == int(mem.lane_rom[0, 0]) & 0xFFFFFFFF  # lane 0 in the lowest bits


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalc.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.tool
def test_compile_target_verilog_build(tmp_path):
    g = random_graph("d40_h5", seed=9)
    ckpt = save_pt(g, tmp_path / "m.pt")
    out = tmp_path / "out"
    res = cli("compile", str(ckpt), "--target", "verilog", "-o", str(out), "--build")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == out / "sim.vvp"
    check(g, out, [4, 5, 6])
    res = cli("compile", str(ckpt), "--target", "verilog", "-o", str(tmp_path / "o2"), "--build", "--cflags", "-O2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "--cflags" in res.stderr
    assert not (tmp_path / "o2").exists()


@pytest.mark.tool
def test_yosys_synthesises_the_core(tmp_path):
    require_tool("yosys")
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(random_graph("all_on", seed=1), out)
    stat = synthesize(out, timeout=900)
    cells = {name: int(count) for name, count in re.findall(r"^\s+([A-Z]\w+)\s+(\d+)$", stat, re.MULTILINE)}
    # the lane ROM (552 words) and the RAM (62 words, a copy a read port) in block RAMs, the key and
    # value caches (40 words each) in LUT RAMs, none in flip-flops (the 307 words read one at a
    # time are few enough to be logic)
    assert cells.get("RAMB36E1", 0) + cells.get("RAMB18E1", 0) >= 3, stat
    assert any(name.startswith("RAM") and name[3:5].isdigit() for name in cells), stat  # RAM64M, RAM32M...
    assert cells["FDRE"] + cells.get("FDSE", 0) < 32 * (62 + 40 + 40), stat
    assert cells["DSP48E1"] >= 2  # the multiply-accumulate and scaling multipliers, at least
    assert "Number of processes:              0" in stat  # every always block became logic


@pytest.mark.tool
def test_yosys_synthesises_the_core_on_codes(tmp_path):
    # int8 per row at 2 lanes: the lane ROM's 1,800 words of codes (7,180 as words) in block RAMs, a
    # 17 x 33-bit multiplier a lane making words of them
    require_tool("yosys")
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(quantize(random_graph("d40_h5", seed=1), "int8", "row"), out, lanes=2)
    assert "`define LANE_WORDS 1800" in (out / "model.vh").read_text()
    stat = synthesize(out, timeout=900, top="crystal_gen")  # and the generator around the core
    cells = {name: int(count) for name, count in re.findall(r"^\s+([A-Z]\w+)\s+(\d+)$", stat, re.MULTILINE)}
    assert cells.get("RAMB36E1", 0) >= 2, stat  # 1,800 words of 64 bits: 115 Kbit
    assert cells["DSP48E1"] >= 2 * 2 + 2, stat
    assert "Number of processes:              0" in stat


@pytest.mark.tool
def test_verilator_lint_is_clean(tmp_path):
    require_tool("verilator")
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(random_graph("three_blocks_n0_n1", seed=1), out)
    lint(out)


def lint(out: Path) -> None:
    """Verilator -Wall finds nothing in the core, nor in the generator around it."""
    for files in (["crystal_core.v"], ["--top-module", "crystal_gen", "crystal_gen.v", "crystal_core.v"]):
        res = subprocess.run(["verilator", "--lint-only", "-Wall", *files], cwd=out, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0 and "%Warning" not in res.stderr, res.stderr


@pytest.mark.tool
def test_a_sum_of_squares_past_2_63_is_read_unsigned_by_both(tmp_path):
    # a neuron 32000 units out in 3 dimensions: its squared distance in Q16 lies in [2^63, 2^64), a negative
    # int64 but a right answer read unsigned, as the core's square root reads it (the emulator's raised)
    from crystalc.ir.tensor import Tensor

    # No normalisation, and temperatures whose |tau| + 0.1 is 2^14 (its inverse exact in Q16): the weights
    # e^(-d / 2^14), about e^-3.4, reach the logits, so a wrong distance shows (not only a crash).
    cfg = dict(vocab_size=5, d_model=3, n_ctx=2, n_heads=3, n_blocks=1, n_neurons=[2], ffn_hidden=2,
               field_norm=False)
    g = random_graph(cfg, seed=8)
    far = {"blocks.0.field.positions": 32000.0, "blocks.0.field.temperature": 16383.9}
    g = g.map_tensors(lambda t: Tensor(t.name, np.full_like(t.data, far[t.name])) if t.name in far else t)
    # |h| < 100 after a LayerNorm of random weights, so each squared distance lies between these
    assert 2**63 <= 3 * ((32000 - 100) * fp.ONE) ** 2 and 3 * ((32000 + 100) * fp.ONE) ** 2 < 2**64
    check(g, built(g, tmp_path / "out"), [1, 2])


@pytest.mark.tool
def test_a_layer_norm_variance_past_2_63_is_divided_unsigned_by_both(tmp_path):
    # x = (30000, 30000, -30000), in range for Q16.16: D x variance in Q32 is 1.03e19, in [2^63, 2^64); divided
    # as a signed number it was negative and the LayerNorm (all of them, the final one too) came out 0.33, not 0.71
    from crystalc.ir.tensor import Tensor

    cfg = dict(vocab_size=4, d_model=3, n_ctx=2, n_heads=1, n_blocks=1, n_neurons=0, ffn_hidden=2, final_norm=True)
    g = random_graph(cfg, seed=1)
    half = np.array([15000.0, 15000.0, -15000.0], dtype=np.float32)  # token 0's row and position 0's: x is twice it

    def planted(t: Tensor) -> Tensor:
        if t.name not in ("token_embed.weight", "pos_embed.weight"):
            return t
        data = t.data.copy()
        data[0] = half
        return Tensor(t.name, data)

    g = g.map_tensors(planted)
    dx = np.round((2 * half - 2 * half.mean()) * fp.ONE).astype(object)
    assert 2**63 <= int((dx * dx).sum()) < 2**64
    check(g, built(g, tmp_path / "out"), [0])


@pytest.mark.tool
def test_a_reset_starts_the_core_whatever_its_registers_powered_up_as(tmp_path):
    # Verilator with every register and memory word random at time 0 (found by a design review: without a
    # reset, seeds whose start registers powered up 1 ran the core on garbage and hung); the testbench
    # holds rst for the first clock edge, after which the logits are the emulator's, word for word
    require_tool("verilator")
    g = random_graph("all_on", seed=3)
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(g, out, lanes=16)
    res = subprocess.run(["make", "-s", "-C", str(out), "verilator", "VFLAGS=--x-initial unique --x-assign unique"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    (out / "ids.hex").write_text("".join(f"{i:08x}\n" for i in (3, 5, 7)))
    want = fp.emulate(fp.lower(g), [3, 5, 7]).tolist()
    for seed in (1, 2, 3, 4):
        res = subprocess.run([str(out / "obj_dir" / "crystal_sim"), "+prompt=ids.hex", "+tokens=3",
                              "+verilator+rand+reset+2", f"+verilator+seed+{seed}"],
                             cwd=out, capture_output=True, text=True, timeout=SIM_TIMEOUT)
        got = [int(line.split()[2]) for line in res.stdout.splitlines() if line.startswith("logit ")]
        assert got == want, (seed, res.stdout[-500:])


@pytest.mark.tool
def test_a_reset_mid_run_then_a_new_start_runs_clean(tmp_path):
    # the host resets the design while it works (in the prompt's first position, then with tokens made
    # and the window shifted), loads the prompt again and starts again: the tokens are a clean run's
    g = random_graph("d40_h5", seed=16)  # window 9
    out = built(g, tmp_path / "out", lanes=3)
    ids = [3, 22, 9, 4]
    prog = fp.lower(g)
    want = generate(g, ids, 12, 3, logits_of=lambda ctx: fp.emulate(prog, ctx))
    (out / "ids.hex").write_text("".join(f"{i:08x}\n" for i in ids))
    for abort in (40, cycles_counted(prog, 3, len(ids), 8, 3)):  # 8 tokens made: the window has shifted
        res = subprocess.run(["vvp", "-n", "sim.vvp", "+prompt=ids.hex", f"+tokens={len(ids)}", "+generate=12",
                              "+shift=3", f"+abort={abort}"], cwd=out, capture_output=True, text=True, timeout=60)
        got = [int(line.split()[1]) for line in res.stdout.splitlines() if line.startswith("token ")]
        assert got == want, (abort, res.stdout[-500:])


@pytest.mark.tool
def test_simulate_refuses_bad_prompts(tmp_path):
    from crystalc.errors import CrystalError

    out = built(random_graph("all_on", seed=1), tmp_path / "out")
    for ids in ([], [0] * 6, [17], [-1]):  # n_ctx 5, vocabulary 17
        with pytest.raises(CrystalError):
            simulate(out, ids)
    with pytest.raises(CrystalError, match="unknown simulator 'modelsim'; known: icarus, verilator"):
        simulate(out, [1], simulator="modelsim")
    (out / "sim.vvp").unlink()
    with pytest.raises(CrystalError, match="build first"):
        simulate(out, [1])


@pytest.mark.tool
def test_simulate_command_names_a_damaged_file(tmp_path):
    # a compiled folder is read back: a file damaged since is one line naming it, not a traceback, and a
    # memory short of words (which $readmemh would leave undefined) is found before the simulation runs
    g = prune_vocab(random_graph("all_on", seed=1), None, [0, 2, 5])
    out = built(g, tmp_path / "out")
    intact = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    damage = [
        ("rom.hex", lambda b: b[: len(b) // 2], "rom.hex is damaged: model.vh says"),
        ("lanes.hex", lambda b: b[:-2] + b"g\n", "lanes.hex is damaged"),  # its last digit
        ("program.hex", lambda b: b + b"00\n", "program.hex is damaged"),
        ("rom.hex", lambda b: b + b"00000000\n", "rom.hex is damaged"),  # one word too many, of the right width
        ("gelu.hex", lambda b: b"", "gelu.hex is damaged"),
        ("model.vh", lambda b: b.replace(b"`define N_CTX", b"`define N_CTXX"), "model.vh defines no N_CTX"),
        ("model.vh", lambda b: b"\xff" + b, "model.vh: cannot read it"),
        ("vocab_map.txt", lambda b: b"1 x 2\n", "vocab_map.txt: not a list of token ids"),
    ]
    for name, spoil, why in damage:
        (out / name).write_bytes(spoil(intact[name]))
        res = cli("simulate", str(out), "--prompt-ids", "2")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, (name, res.stderr)
        (out / name).write_bytes(intact[name])
    assert cli("simulate", str(out), "--prompt-ids", "2").returncode == 0


@pytest.mark.tool
@pytest.mark.parametrize("shape", ["three_blocks_n0_n1", "tied_unnormalised"])
def test_verilator_simulation_equals_icarus_and_the_emulator(shape, tmp_path):
    # a second, independent simulator (Verilog compiled to C++) of the same core and testbench
    require_tool("verilator")
    g = random_graph(shape, seed=5)
    out = built(g, tmp_path / "out")
    BACKEND.build(out, simulator="verilator")
    ids = np.random.default_rng(3).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    icarus, icarus_cycles = simulate(out, ids)
    verilator, verilator_cycles = simulate(out, ids, simulator="verilator")
    assert verilator.tolist() == icarus.tolist() == fp.emulate(fp.lower(g), ids).tolist()
    assert verilator_cycles == icarus_cycles


@pytest.mark.tool
@pytest.mark.parametrize("shape,lanes,quant", [
    ("three_blocks_n0_n1", 1, None),  # blocks of 0, 1 and 5 neurons, a final norm
    ("d40_h5", 3, ("int8", "row")),  # codes through the lanes' multipliers, 3 lanes not dividing 40
])
def test_the_netlist_yosys_synthesises_simulates_as_the_rtl(shape, lanes, quant, tmp_path):
    # Yosys reads the design (its processes, state machines, the memories and the .hex files they load) and
    # writes it back as Verilog: Verilator's simulation of that must compute what Icarus computes from the
    # RTL word for word (logits, greedy tokens, clock cycles), or synthesis and simulation disagree on what
    # the RTL means
    require_tool("yosys", "verilator")
    g = random_graph(shape, seed=6)
    g = g if quant is None else quantize(g, *quant)
    out = built(g, tmp_path / "out", lanes)
    BACKEND.build(out, simulator="netlist")
    netlist = (out / "netlist.v").read_text()
    assert "module crystal_gen" in netlist and "module crystal_core" not in netlist  # flattened: all Yosys's
    assert "$readmem" not in netlist and not (out / "netlist.v.tmp").exists()
    ids = np.random.default_rng(2).integers(0, g.config.vocab_size, g.config.n_ctx - 2).tolist()
    netlist = simulate(out, ids, simulator="netlist")
    assert netlist[0].tolist() == fp.emulate(fp.lower(g), ids).tolist()
    assert netlist[1] == simulate(out, ids)[1]
    made, rtl_made = (simulate(out, ids, sim, generate=6, shift=2) for sim in ("netlist", "icarus"))  # shifts
    assert made[0].tolist() == rtl_made[0].tolist() and made[1] == rtl_made[1]
    # the same netlist under Icarus (make netlist.vvp, for gate-level netlists), one token
    subprocess.run(["make", "-s", "-C", str(out), "netlist.vvp"], check=True, capture_output=True, timeout=300)
    (out / "one.hex").write_text(f"{ids[0]:08x}\n")
    runs = [subprocess.run(["vvp", "-n", vvp, "+prompt=one.hex", "+tokens=1"], cwd=out, capture_output=True,
                           text=True, timeout=SIM_TIMEOUT, check=True).stdout for vvp in ("netlist.vvp", "sim.vvp")]
    assert runs[0] == runs[1] and runs[0].count("logit ") == g.config.vocab_size


def test_the_simulate_command_offers_every_simulator():
    from crystalc.cli import simulate as command

    option = next(p for p in command.params if p.name == "simulator")
    assert list(option.type.choices) == list(verilog.SIMULATORS)  # the CLI names them without importing the backend


def test_compile_refuses_what_q16_cannot_hold(tmp_path):
    g = random_graph("all_on", seed=3)
    big = g.map_tensors(lambda t: type(t)(t.name, t.data * 1e5) if t.name == "pos_embed.weight" else t)
    ckpt = save_pt(big, tmp_path / "m.pt")
    res = cli("compile", str(ckpt), "--target", "verilog", "-o", str(tmp_path / "out"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "pos_embed.weight: a value of" in res.stderr and "does not fit Q16.16" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.tool
def test_simulate_command_speaks_original_ids(tmp_path):
    full = random_graph("d40_h5", seed=11)
    keep = [0, 3, 4, 9, 15, 22]
    g = prune_vocab(full, None, keep)
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(g, out)  # not built: simulate builds it
    res = cli("simulate", str(out), "--prompt-ids", "3,22,9")
    assert res.returncode == 0, res.stderr
    rows = [line.split() for line in res.stdout.splitlines()]
    assert [int(r[0]) for r in rows] == keep
    want = fp.emulate(fp.lower(g), g.to_current_ids([3, 22, 9]))
    assert [r[1] for r in rows] == [f"{int(w) / fp.ONE:.9g}" for w in want]
    assert res.stderr == f"{cycles_counted(fp.lower(g), 1, 3):,} clock cycles for 3 tokens\n"
    for bad, why in (("3,5", "token id 5 is not in this model's vocabulary (pruned)"), ("x", "comma-separated")):
        res = cli("simulate", str(out), "--prompt-ids", bad)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
    res = cli("simulate", str(tmp_path), "--prompt-ids", "3")
    assert res.returncode == 2 and "not a folder compiled with --target verilog" in res.stderr
    # -n: greedy tokens generated by the hardware, as the programs print them for --prompt-ids
    res = cli("simulate", str(out), "--prompt-ids", "3,22,9", "-n", "12", "--shift", "2")
    assert res.returncode == 0, res.stderr
    prog = fp.lower(g)
    rows = generate(g, g.to_current_ids([3, 22, 9]), 12, 2, logits_of=lambda ctx: fp.emulate(prog, ctx))
    assert res.stdout == ",".join(str(keep[r]) for r in rows) + "\n"
    assert res.stderr == f"{cycles_counted(prog, 1, 3, 12, 2):,} clock cycles for 3 + 12 tokens\n"
    assert simulate_generate(out, [3, 22, 9], 12, 2)[0] == [keep[r] for r in rows]
    for bad, why in ((["-n", "2", "--shift", "0"], "--shift 0 is outside 1..9"),
                     (["-n", "2", "--shift", "10"], "outside 1..9"),
                     (["-n", "-1"], "-1 is not in the range 0<=x<=1000000000")):
        res = cli("simulate", str(out), "--prompt-ids", "3", *bad)  # -n once: an option given twice is refused
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
    for shift in ("1", "0"):  # printing logits only, a shift is a mistaken command line, as beside --logits
        res = cli("simulate", str(out), "--prompt-ids", "3", "--shift", shift)
        want = "crystalc: error: --shift has no effect without -n, which prints the prompt's logits and generates " \
               "nothing\n"
        assert res.returncode == 2 and res.stderr == want, res.stderr
    # the programs' bound on -n, before anything is simulated (the testbench counts in 32 bits)
    res = cli("simulate", str(out), "--prompt-ids", "3", "-n", "1000000001")
    assert res.returncode == 2 and "1000000001 is not in the range 0<=x<=1000000000" in res.stderr, res.stderr


@pytest.mark.tool
def test_simulate_command_speaks_text(tmp_path):
    # compile writes the model's tokenizer beside the hardware; --prompt is encoded with it, its last
    # N_CTX tokens run, and -n prints the prompt and the hardware's tokens as text, as the programs do
    chars = "abcdefghijklmnopqrstuvw"  # the 23 ids of d40_h5, whose window is 9
    g = random_graph("d40_h5", seed=17, tokenizer={"kind": "char", "chars": chars})
    out = tmp_path / "out"
    out.mkdir()
    BACKEND.emit(g, out)
    assert json.loads((out / "tokenizer.json").read_text()) == g.tokenizer
    prompt = "abcdefghijkl"
    ids = [chars.index(c) for c in prompt][-9:]
    prog = fp.lower(g)
    res = cli("simulate", str(out), "--prompt", prompt, "-n", "10", "--shift", "2")
    assert res.returncode == 0, res.stderr
    made = generate(g, ids, 10, 2, logits_of=lambda ctx: fp.emulate(prog, ctx))
    assert res.stdout == prompt + "".join(chars[i] for i in made) + "\n"
    assert res.stderr == f"{cycles_counted(prog, 1, 9, 10, 2):,} clock cycles for 9 + 10 tokens\n"
    res = cli("simulate", str(out), "--prompt", prompt)
    assert [line.split()[1] for line in res.stdout.splitlines()] == [
        f"{int(w) / fp.ONE:.9g}" for w in fp.emulate(prog, ids)]
    for args, why in ((["--prompt", "abz"], "character 'z' is not in the model's vocabulary"),
                      (["--prompt", "ab", "--prompt-ids", "1"], "give exactly one of --prompt and --prompt-ids"),
                      ([], "give exactly one of --prompt and --prompt-ids"), (["--prompt", ""], "no tokens")):
        res = cli("simulate", str(out), *args)
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
    # tokenizer.json is a file anyone can edit: nested past JSON's recursion limit, or fewer tokens than the
    # hardware's vocabulary (decoding its ids raised IndexError), it is refused in one line
    for text, why in (("[" * 100000 + "]" * 100000, "not a tokenizer"), ('{"kind": "char", "chars": "abc"}',
                                                                           "a tokenizer of 3 tokens, but the "
                                                                           "hardware's model has 23")):
        (out / "tokenizer.json").write_text(text)
        res = cli("simulate", str(out), "--prompt", "ab", "-n", "2")
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
    (out / "tokenizer.json").unlink()
    res = cli("simulate", str(out), "--prompt", "ab")
    assert res.returncode == 2 and "has no tokenizer.json (its model had no tokenizer): give --prompt-ids" in res.stderr
    # a pruned model's folder: a text prompt's pruned token named as text (an audit: "token id 2 is not in this
    # model's vocabulary"), before the simulation is built
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    BACKEND.emit(prune_vocab(g, None, [0, 1, 3]), pruned)
    res = cli("simulate", str(pruned), "--prompt", "abc")
    assert res.returncode == 2 and res.stderr == "crystalc: error: --prompt: token 'c' (id 2) was pruned from this " \
        "model's vocabulary\n", res.stderr
    assert not (pruned / "sim.vvp").exists()


@pytest.mark.tool
@pytest.mark.parametrize("shape", ["d40_h5", "three_blocks_n0_n1", "tied_unnormalised"])
def test_lanes_give_the_same_words_in_fewer_cycles(shape, tmp_path):
    # 3 lanes divide none of these widths (40, 80, 23; 12, 20, 19; 24, 36, 31): every layer has a short group;
    # the fields' neurons (7; 0, 1, 5; 4, 3) leave short groups too, and 8 lanes outnumber every field; at
    # 5 lanes three_blocks' heads (4 wide) are narrower than the lanes while its 7 positions are not, so
    # the scores' groups wait for their drains
    g = random_graph(shape, seed=12)
    ids = np.random.default_rng(2).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    want = fp.emulate(fp.lower(g), ids).tolist()
    cycles = {}
    for lanes in (1, 3, 5, 8):
        out = tmp_path / str(lanes)
        out.mkdir()
        BACKEND.emit(g, out, lanes=lanes)
        BACKEND.build(out)
        got, cycles[lanes] = simulate(out, ids)
        assert got.tolist() == want, lanes
        assert cycles[lanes] == cycles_counted(fp.lower(g), lanes, len(ids)), lanes
    assert cycles[1] > cycles[3] > cycles[5] > cycles[8]


@pytest.mark.tool
def test_lanes_under_verilator_and_lint(tmp_path):
    require_tool("verilator")
    g = quantize(random_graph("d40_h5", seed=13), "int8", "row")  # the lanes make words of codes
    BACKEND.emit(g, tmp_path, lanes=4)
    lint(tmp_path)
    BACKEND.build(tmp_path)
    BACKEND.build(tmp_path, simulator="verilator")
    ids = [1, 2, 3, 4, 5]
    icarus, verilator = simulate(tmp_path, ids), simulate(tmp_path, ids, simulator="verilator")
    assert icarus[0].tolist() == verilator[0].tolist() == fp.emulate(fp.lower(g), ids).tolist()
    assert icarus[1] == verilator[1]
    icarus, verilator = (simulate(tmp_path, ids, simulator=sim, generate=9, shift=2) for sim in ("icarus", "verilator"))
    assert icarus[0].tolist() == verilator[0].tolist() and icarus[1] == verilator[1]
    from crystalc.errors import CrystalError

    with pytest.raises(CrystalError, match="--lanes 0 is outside 1..64"):
        BACKEND.emit(g, tmp_path / "x", lanes=0)


def test_compile_lanes_option(tmp_path):
    ckpt = save_pt(random_graph("all_on", seed=14), tmp_path / "m.pt")
    res = cli("compile", str(ckpt), "--target", "verilog", "--lanes", "5", "-o", str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert "`define LANES 5" in (tmp_path / "out" / "model.vh").read_text()
    for args, why in ((["--target", "c", "--lanes", "2"], "--lanes applies to --target verilog only"),
                      (["--target", "verilog", "--lanes", "0"], "0 is not in the range 1<=x<=64")):
        res = cli("compile", str(ckpt), *args, "-o", str(tmp_path / "bad"))
        assert res.returncode == 2 and res.stderr.count("\n") == 1 and why in res.stderr, res.stderr
        assert not (tmp_path / "bad").exists()


def test_options_are_named_exactly(tmp_path):
    """emit and build take their options by keyword, and a misspelt one is an error, not a default."""
    g = random_graph("all_on", seed=1)
    with pytest.raises(TypeError, match="lane"):
        BACKEND.emit(g, tmp_path, lane=8)
    with pytest.raises(TypeError):
        BACKEND.emit(g, tmp_path, 8)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="simulater"):
        BACKEND.build(tmp_path, simulater="verilator")
    with pytest.raises(TypeError, match="cflags"):
        BACKEND.build(tmp_path, cflags="-O2")
