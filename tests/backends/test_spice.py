"""The SPICE backend: ngspice solves each block's neuron field as a circuit.

Tolerances: the field's outputs within 1e-6 of the largest of the interpreter's
float32 neuron_field (of 1e-3 for a field smaller than that), logits (the field
by ngspice, every other op by the interpreter) within 1e-4 of interpret.forward,
as for C. The circuit is solved in double precision to a relative tolerance of
1e-12; its exponentials are ngspice's diode equation at the thermal voltage
ngspice itself uses, so what differs is the interpreter's float32 rounding
(measured: 0.7e-7 to 2.1e-7 of the largest output on the fixture shapes, a few
of float32's 6e-8 steps) and the diode's -IS term and GMIN leak (below 1e-9 of
a weight; emit refuses a field_eps too small for that). A changed mirror gain
(below), resistor or eps current (scripts/mutants.txt) moves them by far more.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crystalc.backends import spice
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import forward, neuron_field
from crystalc.ir.ops import NeuronField
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool, save_pt

FIELD_TOL = 1e-6  # of the field's largest output (at least 1e-3)
LOGIT_TOL = 1e-4


def field_error(got: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference, in units of the reference's largest output (at least 1e-3)."""
    return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-3)


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("ngspice")


def emitted(graph: Graph, out: Path) -> Path:
    out.mkdir(parents=True)
    spice.BACKEND.emit(graph, out)
    return out


def field_inputs(graph: Graph, ids: list[int]) -> list[np.ndarray]:
    """Each block's neuron_field input h [S, D] on the interpreter's way through `ids`."""
    hs: list[np.ndarray] = []

    def capture(_block: int, op: NeuronField, h: np.ndarray) -> np.ndarray:
        hs.append(h)
        return neuron_field(op, h)

    forward(graph, ids, field_fn=capture)
    return hs


@pytest.mark.tool
@pytest.mark.parametrize("shape", sorted(FIXTURE_SHAPES))
def test_fields_and_logits_match_the_interpreter(shape, tmp_path):
    g = random_graph(shape, seed=2)
    out = emitted(g, tmp_path / "out")
    ids = np.random.default_rng(5).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    for b, h in enumerate(field_inputs(g, ids)):
        op = g.blocks[b].field
        if op.n_neurons:
            got = spice.simulate_field(out, b, h)
            assert field_error(got, neuron_field(op, h)) <= FIELD_TOL
        else:
            assert not (out / spice.netlist_name(b)).exists()
    assert np.abs(spice.forward(g, out, ids) - forward(g, ids)).max() <= LOGIT_TOL


@pytest.mark.tool
def test_quantized_pruned_graph(tmp_path):
    g = quantize(prune_vocab(random_graph("d40_h5", seed=3), None, [0, 1, 2, 5, 8, 13, 21]), "int8", "row")
    out = emitted(g, tmp_path / "out")
    ids = [0, 3, 6, 2]
    assert np.abs(spice.forward(g, out, ids) - forward(g, ids)).max() <= LOGIT_TOL


@pytest.mark.tool
def test_a_far_field_where_eps_decides(tmp_path):
    # temperatures such that the nearest neuron is ln(1/eps) temperatures away: the eps current is
    # as large as the neurons' together, and the diodes carry about IS * e^(42 - 18.4)
    g = random_graph("d40_h5", seed=6)
    ids = [1, 2, 3]
    h = field_inputs(g, ids)[0]
    op = g.blocks[0].field
    nearest = float(np.sqrt(((op.positions.values() - h[-1]) ** 2).sum(axis=1)).min())
    tau = nearest / -math.log(g.config.field_eps) - 0.1
    temp = op.temperature
    far = g.map_tensors(lambda t: type(t)(t.name, np.full_like(t.data, tau)) if t is temp else t)
    out = emitted(far, tmp_path / "out")
    field = far.blocks[0].field
    got = spice.simulate_field(out, 0, h)
    assert field_error(got, neuron_field(field, h)) <= FIELD_TOL
    assert np.abs(got - neuron_field(dataclasses.replace(field, eps=0.0), h)).max() > 0.1


@pytest.mark.tool
def test_a_far_field_where_eps_decides_in_a_frozen_core(tmp_path):
    # the hybrid: the circuit's sums and fden, the active neurons and eps added digitally; far enough that
    # dropping eps on the digital side moves the field by far more than the tolerance
    g = random_graph("d40_h5", seed=6)
    h = field_inputs(g, [1, 2, 3])[0]
    op = g.blocks[0].field
    nearest = float(np.sqrt(((op.positions.values() - h[-1]) ** 2).sum(axis=1)).min())
    tau = nearest / -math.log(g.config.field_eps) - 0.1
    far = g.map_tensors(lambda t: type(t)(t.name, np.full_like(t.data, tau)) if t is op.temperature else t)
    out = tmp_path / "out"
    out.mkdir()
    spice.BACKEND.emit(far, out, frozen_only=True)
    field = far.blocks[0].field
    assert 0 < np.count_nonzero(field.frozen.data) < field.n_neurons
    core = spice.simulate_field(out, 0, h)
    assert core.shape == (len(h), 41)
    got = spice._with_active_neurons(field, h, core)
    assert field_error(got, neuron_field(field, h)) <= FIELD_TOL
    assert np.abs(got - neuron_field(dataclasses.replace(field, eps=0.0), h)).max() > 0.1


@pytest.mark.tool
def test_inputs_on_a_neuron_and_beyond_it(tmp_path):
    # h on a neuron, or further out along its direction, makes the squared distance negative in Newton's
    # first iterates; ngspice stopped on sqrt's domain (and D = 1 met that in ordinary use)
    g = random_graph("d40_h5", seed=2)
    out = emitted(g, tmp_path / "out")
    op = g.blocks[0].field
    pos = op.positions.values()
    h = np.stack([pos[0], 2 * pos[0], 1.5 * pos[1], 30 * pos[2]]).astype(np.float32)
    assert field_error(spice.simulate_field(out, 0, h), neuron_field(op, h)) <= FIELD_TOL
    netlist = out / spice.netlist_name(0)
    netlist.write_text(netlist.read_text().replace("sqrt(abs(V(sq0))", "sqrt((V(sq0))"))
    with pytest.raises(CrystalError, match="out of range for sqrt") as raised:  # the cause, not a node dump
        spice.simulate_field(out, 0, h[:1])
    assert "\n" not in str(raised.value)
    one = random_graph(dict(vocab_size=5, d_model=1, n_ctx=4, n_heads=1, n_blocks=1, n_neurons=3, ffn_hidden=3),
                       seed=5)
    out1 = emitted(one, tmp_path / "one")
    ids = [0, 3, 1, 4]
    assert np.abs(spice.forward(one, out1, ids) - forward(one, ids)).max() <= LOGIT_TOL


@pytest.mark.tool
def test_the_users_spiceinit_changes_nothing(tmp_path, monkeypatch):
    # ngspice reads ~/.spiceinit unless told not to: a temperature of 50 C there moved the field by 0.035
    g = random_graph("all_on", seed=4)
    out = emitted(g, tmp_path / "out")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".spiceinit").write_text("option temp=50\n")
    monkeypatch.setenv("HOME", str(home))
    h = field_inputs(g, [1, 2])[0]
    assert field_error(spice.simulate_field(out, 0, h), neuron_field(g.blocks[0].field, h)) <= FIELD_TOL


def test_emit_refuses_a_field_eps_too_small_for_the_circuit(tmp_path):
    # a neuron beyond 42 temperatures carries -IS: next to an eps current of 0 (or 1e-14) that is the output;
    # here sum_j |val_jk| reaches 5.1, so eps 1e-11 lets it reach 2.9e-7 of an output, 3e-11 9.8e-8
    for eps in (0.0, 1e-14, 1e-11):
        g = random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": eps}, seed=1)
        with pytest.raises(CrystalError, match=f"field_eps {eps:g} is too small for the SPICE circuit of block 0"):
            spice.BACKEND.emit(g, tmp_path)
        assert not list(tmp_path.iterdir())
    spice.BACKEND.emit(random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": 3e-11}, seed=1), tmp_path)
    unnormalised = random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": 0.0, "field_norm": False}, seed=1)
    assert spice.far_field_error(unnormalised.blocks[0].field) == 0.0  # read against IS e^A, not eps
    spice.BACKEND.emit(unnormalised, tmp_path)


@pytest.mark.tool
def test_a_changed_value_changes_the_output(tmp_path):
    g = random_graph("all_on", seed=4)
    out = emitted(g, tmp_path / "out")
    h = np.random.default_rng(1).standard_normal((2, 8))
    before = spice.simulate_field(out, 0, h)
    netlist = out / spice.netlist_name(0)
    text = netlist.read_text()
    line = next(li for li in text.splitlines() if li.startswith("F1_3 "))
    gain = float(line.split()[-1])
    netlist.write_text(text.replace(line, " ".join(line.split()[:-1] + [repr(gain + 1.0)])))
    after = spice.simulate_field(out, 0, h)
    op = g.blocks[0].field
    moved = np.abs(after - before)
    assert moved[:, 3].min() > 1e-3 and np.delete(moved, 3, axis=1).max() < 1e-12
    w = neuron_field(dataclasses.replace(op, values=type(op.values)("v", np.eye(2, 8, 3, dtype=np.float32)[::-1])),
                     h.astype(np.float32))
    assert np.abs(moved[:, 3] - w[:, 3]).max() < FIELD_TOL  # exactly neuron 1's weight moved in


def test_emit_names_and_refusals(tmp_path):
    g = random_graph("three_blocks_n0_n1", seed=1)
    out = emitted(g, tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["neuron_field_b1.sp", "neuron_field_b2.sp"]
    text = (out / "neuron_field_b2.sp").read_text()
    assert ".subckt neuron_field_b2 h0" in text and text.count("D0 d0 0 dexp") == 1
    frozen = np.asarray(g.blocks[2].field.frozen.data, dtype=bool)
    assert text.count("(frozen)") == frozen.sum() and text.count("(active)") == (~frozen).sum()
    again = tmp_path / "again"
    again.mkdir()
    spice.BACKEND.emit(g, again)
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in ("neuron_field_b1.sp", "neuron_field_b2.sp"))
    empty = random_graph({**FIXTURE_SHAPES["all_on"], "n_neurons": 0}, seed=1)
    with pytest.raises(CrystalError, match="no block has neurons"):
        spice.BACKEND.emit(empty, tmp_path)
    with pytest.raises(CrystalError, match="does not exist"):
        spice.simulate_field(out, 0, np.zeros((1, 12)))


@pytest.mark.tool
def test_compile_target_spice_build(tmp_path):
    g = random_graph("tied_unnormalised", seed=7)
    ckpt = save_pt(g, tmp_path / "m.pt")
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "crystalc.cli", "compile", str(ckpt), "--target", "spice", "-o",
                          str(out), "--build"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip()) == out / "check.log"
    log = (out / "check.log").read_text().splitlines()
    assert [li.split(":")[0] for li in log] == ["neuron_field_b0.sp", "neuron_field_b1.sp"]
    zero = np.zeros((1, 24), dtype=np.float32)
    for b, line in enumerate(log):
        want = neuron_field(g.blocks[b].field, zero)[0]
        assert field_error(np.array([float(v) for v in line.split(":")[-1].split()]), want) <= FIELD_TOL


# --- the frozen core of a hybrid: frozen neurons in the circuit, active ones digital ----------------

@pytest.mark.tool
@pytest.mark.parametrize("shape", ["d40_h5", "three_blocks_n0_n1", "tied_unnormalised"])
def test_frozen_core_with_digital_active_neurons(shape, tmp_path):
    g = random_graph(shape, seed=2)
    out = tmp_path / "out"
    out.mkdir()
    spice.BACKEND.emit(g, out, frozen_only=True)
    for b, blk in enumerate(g.blocks):
        frozen = np.asarray(blk.field.frozen.data, dtype=bool)
        path = out / spice.netlist_name(b)
        assert path.is_file() == bool(frozen.any())
        if frozen.any():
            text = path.read_text()
            assert text.count("(frozen)") == frozen.sum() and "(active)" not in text and " fden\n" in text
    ids = np.random.default_rng(5).integers(0, g.config.vocab_size, g.config.n_ctx).tolist()
    assert np.abs(spice.forward(g, out, ids) - forward(g, ids)).max() <= LOGIT_TOL


@pytest.mark.parametrize("frozen_only", [False, True])
def test_forward_refuses_a_folder_missing_a_netlist(tmp_path, frozen_only):
    # a block whose netlist is gone must not quietly fall back to the interpreter's field: the parity
    # tests would then compare the interpreter with itself
    g = random_graph("three_blocks_n0_n1", seed=2)
    if frozen_only:  # every neuron frozen, so that two blocks have a frozen core
        g = g.map_tensors(lambda t: type(t)(t.name, np.ones_like(t.data)) if t.name.endswith(".frozen") else t)
    out = tmp_path / "out"
    out.mkdir()
    written = spice.BACKEND.emit(g, out, frozen_only=frozen_only)
    in_circuit = [b for b, blk in enumerate(g.blocks)
                  if (np.count_nonzero(blk.field.frozen.data) if frozen_only else blk.field.n_neurons)]
    assert sorted(p.name for p in written if p.suffix == ".sp") == [spice.netlist_name(b) for b in in_circuit]
    assert len(in_circuit) >= 2
    (out / spice.netlist_name(in_circuit[-1])).unlink()
    with pytest.raises(CrystalError, match=f"{spice.netlist_name(in_circuit[-1])} is missing: block {in_circuit[-1]}"):
        spice.forward(g, out, [1, 2])
    for p in out.glob("*.sp"):
        p.unlink()
    with pytest.raises(CrystalError, match="holds no neuron_field netlist"):
        spice.forward(g, out, [1, 2])


def test_frozen_core_needs_frozen_neurons(tmp_path):
    g = random_graph("all_on", seed=1)
    frozen = g.blocks[0].field.frozen
    none = g.map_tensors(lambda t: type(t)(t.name, np.zeros_like(t.data)) if t is frozen else t)
    with pytest.raises(CrystalError, match="no block has frozen neurons"):
        spice.BACKEND.emit(none, tmp_path, frozen_only=True)


@pytest.mark.tool
def test_compile_frozen_only(tmp_path):
    g = random_graph("d40_h5", seed=2)
    ckpt = save_pt(g, tmp_path / "m.pt")
    cli = [sys.executable, "-m", "crystalc.cli", "compile", str(ckpt)]
    res = subprocess.run([*cli, "--target", "spice", "--frozen-only", "-o", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert " fden" in (tmp_path / "out" / "neuron_field_b0.sp").read_text()
    res = subprocess.run([*cli, "--target", "c", "--frozen-only", "-o", str(tmp_path / "c")], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "--frozen-only applies to --target spice" in res.stderr
    assert not (tmp_path / "c").exists()


def test_options_are_named_exactly(tmp_path):
    """emit and build take their options by keyword, and a misspelt one is an error, not a default."""
    g = random_graph("all_on", seed=1)
    with pytest.raises(TypeError, match="frozen"):
        spice.BACKEND.emit(g, tmp_path, frozen=True)
    with pytest.raises(TypeError):
        spice.BACKEND.emit(g, tmp_path, True)
    assert not list(tmp_path.iterdir())
    with pytest.raises(TypeError, match="cflags"):
        spice.BACKEND.build(tmp_path, cflags="-O2")


def test_the_subckt_line_is_read_in_one_place(tmp_path):
    # build, simulate_field and forward all read a netlist's ports through spice._ports: what emit writes is
    # read back (a frozen core by its fden), anything else is one error naming the file
    g = random_graph("d40_h5", seed=2)
    whole, core = emitted(g, tmp_path / "whole"), tmp_path / "core"
    core.mkdir()
    spice.BACKEND.emit(g, core, frozen_only=True)
    d = g.config.d_model
    assert spice._ports(whole / spice.netlist_name(0)) == (d, [str(k) for k in range(d)])
    assert spice._ports(core / spice.netlist_name(0)) == (d, [*map(str, range(d)), "den"])
    assert not spice._frozen_core(whole) and spice._frozen_core(core)
    path = whole / spice.netlist_name(0)
    text = path.read_text()
    subckt = next(ln for ln in text.splitlines() if ln.startswith(".subckt"))
    for damaged, says in ((text.replace(subckt, subckt.replace(" f1 ", " g1 ")), "ports are not"),
                          (text.replace(".subckt", "*"), "no .subckt line")):
        path.write_text(damaged)
        with pytest.raises(CrystalError, match=says):
            spice.simulate_field(whole, 0, np.zeros((1, d)))
    for p in whole.iterdir():
        p.unlink()
    with pytest.raises(CrystalError, match="holds no neuron_field netlist"):
        spice.BACKEND.build(whole)
