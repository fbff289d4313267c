"""The SPICE backend: ngspice solves each block's neuron field as a circuit.

Tolerances: the field's outputs within 1e-6 of the largest of the interpreter's
float32 neuron_field (of 1e-3 for a field smaller than that), logits (the field
by ngspice, every other op by the interpreter) within 1e-5 of interpret.forward
(no summation order of C's to allow for). The circuit is solved in double precision to a relative tolerance of
1e-12; its exponentials are ngspice's diode equation at the thermal voltage
ngspice itself uses, so what differs is the interpreter's float32 rounding
(measured: 0.7e-7 to 2.1e-7 of the largest output on the fixture shapes, a few
of float32's 6e-8 steps; 1.2e-6 in a far field, where exp(-a) at a = 18 carries
float32's error in a eighteenfold) and the diodes' leaks. Against the spec's field
evaluated in float64 (spec_field) the error model is tighter (spec_tol): the
leaks, which far_field_error bounds, plus the solver's 1e-10 (SOLVE_TOL); and
against the circuit's own equations, the spec's with each diode's -IS
(spec_field(..., leak=True)), what is left is only the solver and ngspice's
reading of the numbers (CIRCUIT_TOL). Every test input set includes one beside
each neuron (near_neurons), so that every neuron weighs in some output. A changed
mirror gain (below), resistor or eps current (scripts/mutants.txt) moves them by
far more.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crystalc.backends import spice
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import field_temperatures, forward, neuron_field
from crystalc.ir.ops import NeuronField
from crystalc.passes.prune_vocab import prune_vocab
from crystalc.passes.quantize import quantize
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool, save_pt

FIELD_TOL = 1e-6  # of the field's largest output (at least 1e-3)
# Only the field comes from ngspice (to FIELD_TOL); every other op is the interpreter's own, so the logits carry
# the field's error through the later ops alone: measured up to 1.9e-6, not C's summation-order 1e-4.
LOGIT_TOL = 1e-5
# Of the largest sum_j |val_jk|: Newton stops when no node moves by more than 1e-12 of itself (reltol), and a
# diode's node (at most 1.09 V) off by that much moves its current by 1.09e-12 / Vt = 4.2e-11 of itself; an
# output, a sum of such currents times val_jk (over their sum, normalised), moves by at most twice that of
# sum_j |val_jk|. Measured: below 1e-14 once the leaks are accounted for (circuit_field).
SOLVE_TOL = 1e-10
# Of the largest sum_j |val_jk|, against the circuit's own equations: the solver (whose last Newton step
# reltol bounds, and the error after it is of that step's square) and every number as ngspice reads it,
# each within an ulp (its reader is not correctly rounded); measured 1.3e-15 to 5.8e-15 on far fields. A
# number read to 9 or 11 digits (the %.9g of old; ngspice's rewrite of a B source's) moved it by 1e-11 or more.
CIRCUIT_TOL = 1e-12


def field_error(got: np.ndarray, ref: np.ndarray) -> float:
    """The largest difference, in units of the reference's largest output (at least 1e-3)."""
    return float(np.abs(got - ref).max()) / max(float(np.abs(ref).max()), 1e-3)


@pytest.fixture(scope="module", autouse=True)
def tools():
    require_tool("ngspice")


def spread(op: NeuronField) -> float:
    """The largest sum_j |val_jk|: what an output is made of, the scale of the solver's error."""
    return float(np.abs(op.values.values().astype(np.float64)).sum(axis=0).max())


def weights(op: NeuronField, h: np.ndarray, leak: bool = False) -> np.ndarray:
    """exp(-a_j) [S, N] in float64, from the graph's float32 parameters and |tau| + 0.1 as field_temperatures
    rounds it (the divisor the interpreter and the netlist both take). leak: as the circuit's diodes carry
    them, IS (exp(A - a_j) - 1) in units of IS e^A (for a_j within A + 3, where ngspice's diode is that
    equation)."""
    pos = op.positions.values().astype(np.float64)
    a = np.sqrt(((h.astype(np.float64)[:, None, :] - pos[None]) ** 2).sum(axis=-1)) / field_temperatures(op)
    if leak:
        assert a.max() <= spice.DRIVE_A + 3
    return np.exp(-a) - (math.exp(-spice.DRIVE_A) if leak else 0.0)


def spec_field(op: NeuronField, h: np.ndarray, leak: bool = False) -> np.ndarray:
    """The spec's field in float64 (leak: the circuit's own equations, each diode's -IS in them)."""
    w = weights(op, h, leak)
    num = w @ op.values.values().astype(np.float64)
    return num / (w.sum(axis=1, keepdims=True) + op.eps) if op.normalize else num


def leaky_core(op: NeuronField, h: np.ndarray) -> np.ndarray:
    """What a frozen core's circuit outputs by its own equations: the frozen neurons' sums f<k> and fden,
    each diode's -IS in them."""
    frozen = np.asarray(op.frozen.data, dtype=bool)
    w = weights(op, h, leak=True)[:, frozen]
    return np.concatenate([w @ op.values.values()[frozen].astype(np.float64), w.sum(axis=1, keepdims=True)], 1)


def spec_tol(op: NeuronField) -> float:
    """How far the circuit may be from spec_field: the diodes' leaks (far_field_error), the solver (SOLVE_TOL)."""
    return spice.far_field_error(op) + SOLVE_TOL * spread(op)


def near_neurons(op: NeuronField, seed: int) -> np.ndarray:
    """An input beside each neuron [N, D] (a tenth of its temperature away, in a random direction), so that
    every neuron weighs in some output: the test models' own inputs leave some near 0."""
    rng = np.random.default_rng(seed)
    step = rng.standard_normal(op.positions.values().shape)
    step *= (0.1 * field_temperatures(op) / np.linalg.norm(step, axis=1))[:, None]
    return (op.positions.values() + step).astype(np.float32)


def check_field(out: Path, block: int, op: NeuronField, h: np.ndarray) -> np.ndarray:
    """The field of out's netlist for `block` at h against the spec's (a frozen core's with the active neurons
    added); returns it."""
    got = spice.simulate_field(out, block, h)
    if got.shape[1] > h.shape[1]:
        got = spice._with_active_neurons(op, h, got)
    assert np.abs(got - spec_field(op, h)).max() <= spec_tol(op)
    return got


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
            h = np.concatenate([h, near_neurons(op, seed=b)])
            got = check_field(out, b, op, h)
            assert field_error(got, neuron_field(op, h)) <= FIELD_TOL
        else:
            assert not (out / spice.netlist_name(b)).exists()
    assert np.abs(spice.forward(g, out, ids) - forward(g, ids)).max() <= LOGIT_TOL


@pytest.mark.tool
def test_quantized_pruned_graph(tmp_path):
    g = quantize(prune_vocab(random_graph("d40_h5", seed=3), None, [0, 1, 2, 5, 8, 13, 21]), "int8", "row")
    out = emitted(g, tmp_path / "out")
    ids = [0, 3, 6, 2]
    op = g.blocks[0].field
    check_field(out, 0, op, np.concatenate([field_inputs(g, ids)[0], near_neurons(op, seed=3)]))
    assert np.abs(spice.forward(g, out, ids) - forward(g, ids)).max() <= LOGIT_TOL


def far_field(seed: int) -> tuple[Graph, list[int], np.ndarray]:
    """d40_h5 with every temperature such that the nearest neuron to the last position's field input is
    ln(1/eps) temperatures away: the eps current is as large as the neurons' together there, and the diodes
    carry about IS e^(42 - 18.4). The graph, its ids and block 0's field inputs."""
    g = random_graph("d40_h5", seed=seed)
    ids = [1, 2, 3]
    h = field_inputs(g, ids)[0]
    op = g.blocks[0].field
    nearest = float(np.sqrt(((op.positions.values() - h[-1]) ** 2).sum(axis=1)).min())
    tau = nearest / -math.log(g.config.field_eps) - 0.1
    far = g.map_tensors(lambda t: type(t)(t.name, np.full_like(t.data, tau)) if t is op.temperature else t)
    return far, ids, h


# seed 3 puts the interpreter's float32 1.2e-6 off the field there (exp(-a) at a = 18): the field is checked
# against spec_field, the interpreter only through the logits
FAR_SEEDS = [3, 6, 9]


@pytest.mark.tool
@pytest.mark.parametrize("seed", FAR_SEEDS)
def test_a_far_field_where_eps_decides(tmp_path, seed):
    far, ids, h = far_field(seed)
    out = emitted(far, tmp_path / "out")
    field = far.blocks[0].field
    got = check_field(out, 0, field, h)
    assert np.abs(got - spec_field(field, h, leak=True)).max() <= CIRCUIT_TOL * spread(field)
    assert np.abs(got - spec_field(dataclasses.replace(field, eps=0.0), h)).max() > 0.1
    assert np.abs(spice.forward(far, out, ids) - forward(far, ids)).max() <= LOGIT_TOL


@pytest.mark.tool
@pytest.mark.parametrize("seed", FAR_SEEDS)
def test_a_far_field_where_eps_decides_in_a_frozen_core(tmp_path, seed):
    # the hybrid: the circuit's sums and fden, the active neurons and eps added digitally; far enough that
    # dropping eps on the digital side moves the field by far more than the tolerance
    far, ids, h = far_field(seed)
    frozen = np.zeros(far.config.n_neurons[0], dtype=bool)
    frozen[::2] = True  # the seeds' masks differ: this one has frozen neurons and active ones
    far = far.map_tensors(lambda t: type(t)(t.name, frozen) if t.name.endswith(".frozen") else t)
    out = tmp_path / "out"
    out.mkdir()
    spice.BACKEND.emit(far, out, frozen_only=True)
    field = far.blocks[0].field
    core = spice.simulate_field(out, 0, h)
    assert core.shape == (len(h), 41)
    got = spice._with_active_neurons(field, h, core)
    assert np.abs(got - spec_field(field, h)).max() <= spec_tol(field)
    circuit = spice._with_active_neurons(field, h, leaky_core(field, h))
    assert np.abs(got - circuit).max() <= CIRCUIT_TOL * spread(field)
    assert np.abs(got - spec_field(dataclasses.replace(field, eps=0.0), h)).max() > 0.1
    assert np.abs(spice.forward(far, out, ids) - forward(far, ids)).max() <= LOGIT_TOL


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


def scaled_values(g: Graph, k: float) -> Graph:
    """g with block 0's field values times k."""
    values = g.blocks[0].field.values
    return g.map_tensors(lambda t: type(t)(t.name, (t.data * k).astype(np.float32)) if t is values else t)


def test_emit_refuses_a_field_eps_too_small_for_the_circuit(tmp_path):
    # a neuron beyond 42 temperatures carries -IS: next to an eps current of 0 (or 1e-14) that is the output;
    # here sum_j |val_jk| + 7 max_j |val_jk| reaches 16.1 and the largest |value| is 1.57, so eps 3e-11 lets it
    # reach 2e-7 of that, and the message names the eps that keeps it below 1e-7 of it: 5.9e-11 (it said inf
    # for an eps of 0). The leaks scale with the values, and so does the bound: values x1000 were refused, and
    # values x0.001 accepted at an eps that left the field 1.65e-5 off
    # (test_the_smallest_eps_emit_accepts_keeps_the_tolerance)
    def graph(eps: float) -> Graph:
        return random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": eps}, seed=1)

    refused, accepted = tmp_path / "refused", tmp_path / "accepted"
    refused.mkdir()
    accepted.mkdir()
    for k in (1.0, 1e-3, 1e3):
        for eps in (0.0, 1e-14, 1e-11, 3e-11, 5.8e-11):
            with pytest.raises(CrystalError, match=f"field_eps {eps:g} is too small for the SPICE circuit of "
                                                   f"block 0") as raised:
                spice.BACKEND.emit(scaled_values(graph(eps), k), refused)
            assert not list(refused.iterdir())
            assert str(raised.value).endswith("only an eps current of field_eps >= 5.9e-11 keeps that below 1e-07 of "
                                              f"the largest |value| ({1.57 * k:.3g})")
        spice.BACKEND.emit(scaled_values(graph(5.9e-11), k), accepted)
    # an unnormalised field's leaks are read against IS e^A, and eps is not in it: no refusal, at any scale (it
    # was refused at values of 1e12, and told to raise field_eps, which it does not use)
    unnormalised = random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": 0.0, "field_norm": False}, seed=1)
    assert spice.far_field_error(unnormalised.blocks[0].field) < 1e-17  # read against IS e^A, not eps
    for k in (1.0, 1e12):
        spice.BACKEND.emit(scaled_values(unnormalised, k), accepted)


def eps_field(eps: float, value: float) -> Graph:
    """At h = 0 neuron 0 (every value `value`) weighs eps, the other seven (values 0) are 60 temperatures away:
    their -IS moves only the denominator."""
    g = random_graph({**FIXTURE_SHAPES["all_on"], "n_neurons": 8, "field_eps": eps}, seed=1)
    op = g.blocks[0].field
    pos = np.zeros((8, 8), dtype=np.float32)
    pos[:, 0] = [-math.log(eps)] + [60.0] * 7
    val = np.zeros((8, 8), dtype=np.float32)
    val[0] = value
    new = {op.positions.name: pos, op.values.name: val, op.temperature.name: np.full(8, 0.9, dtype=np.float32)}
    return g.map_tensors(lambda t: type(t)(t.name, new[t.name]) if t.name in new else t)


@pytest.mark.tool
@pytest.mark.parametrize("value", [1.0, 1e-3])
def test_the_smallest_eps_emit_accepts_keeps_the_tolerance(tmp_path, value):
    # at the eps emit names, the leaks move the field by at most a few of float32's steps of its outputs, at
    # any scale of values: with the bound absolute, values of 1e-3 were accepted 1.65e-5 off
    with pytest.raises(CrystalError) as raised:
        spice.BACKEND.emit(eps_field(1e-30, value), tmp_path)
    found = re.search(r"field_eps >= (\S+) keeps", str(raised.value))
    assert found
    g = eps_field(float(found.group(1)), value)
    out = emitted(g, tmp_path / "out")
    h = np.zeros((1, 8))
    assert field_error(spice.simulate_field(out, 0, h), neuron_field(g.blocks[0].field, h)) <= FIELD_TOL


@pytest.mark.tool
def test_the_leak_bound_counts_the_denominator(tmp_path):
    # at h = 0 neuron 0 (value 1) weighs eps, the other seven (value 0) are 60 temperatures away: their -IS
    # moves only the denominator, and the output by 1.5 e^-A / eps, more than a bound of sum_j |val_jk| e^-A / eps
    # (the default eps: neuron 0 sits where its weight is eps, tiny beside any neuron in reach)
    g = eps_field(1e-8, 1.0)
    op = g.blocks[0].field
    out = emitted(g, tmp_path / "out")
    h = np.zeros((1, 8))
    err = float(np.abs(spice.simulate_field(out, 0, h) - spec_field(op, h)).max())
    assert spread(op) * spice.LEAK_IS * math.exp(-spice.DRIVE_A) / op.eps < err <= spice.far_field_error(op)


@pytest.mark.tool
def test_inputs_far_from_every_neuron(tmp_path):
    # at h0 = 1e30 the drive was -1e30 V, and GMIN (1e-30 S) beside each junction carried 1 A: the output was
    # the values averaged by GMIN's currents, 0.24 off. The drive is capped at 2A temperatures; a non-finite
    # input is refused before ngspice
    g = random_graph("all_on", seed=4)
    op = g.blocks[0].field
    out = emitted(g, tmp_path / "out")
    h = np.zeros((3, 8))
    h[0, 0], h[1, 3], h[2] = 1e30, -3e38, 1e3
    assert np.abs(spice.simulate_field(out, 0, h) - spec_field(op, h)).max() <= spec_tol(op)
    h[1, 3] = np.inf
    with pytest.raises(CrystalError, match=r"^neuron_field_b0.sp: an input is not finite \(row 1\)$"):
        spice.simulate_field(out, 0, h)
    # past float32's range (no float32 model makes one) ngspice failed on its own numbers, a message cut
    # mid-number: refused first
    h[1, 3] = 0
    h[2, 5] = -1e200
    with pytest.raises(CrystalError, match=r"^neuron_field_b0.sp: an input is beyond float32's range \(row 2\)$"):
        spice.simulate_field(out, 0, h)


@pytest.mark.tool
def test_a_result_ngspice_stands_in_for_infinity_is_refused(tmp_path):
    # a B source divides by its divisor plus GMIN x 1e-20, so that 1/0 is 1e50 here, and ngspice exits 0:
    # that is no solution
    g = random_graph("all_on", seed=4)
    out = emitted(g, tmp_path / "out")
    netlist = out / spice.netlist_name(0)
    bout = "Bout1 f1 0 V=V(num1)/V(den)"
    netlist.write_text(netlist.read_text().replace(bout, "Bout1 f1 0 V=1/(V(den)-V(den))"))
    h = np.zeros((2, 8))
    with pytest.raises(CrystalError, match=r"^ngspice gave no finite solution of neuron_field_b0.sp at input row "
                                           r"[01]: f1 = 1\.0*8?e\+0*50$"):
        spice.simulate_field(out, 0, h)


@pytest.mark.tool
def test_an_ngspice_of_other_constants_is_refused(tmp_path, monkeypatch):
    # the netlists' drives are written in ngspice 39's kT/q (CODATA 2014); an ngspice of CODATA 2018's (as a
    # netlist written for them meets here) puts every exponent 1.5e-5 off, which no output would show
    codata_2018 = 1.380649e-23 * 300.15 / 1.602176634e-19
    monkeypatch.setattr(spice, "THERMAL_VOLTAGE", codata_2018)
    out = emitted(random_graph("all_on", seed=4), tmp_path / "out")
    ngspice_39 = 1.38064852e-23 * 300.15 / 1.6021766208e-19
    with pytest.raises(CrystalError, match=rf"^this ngspice's thermal voltage at 27 C is {ngspice_39:.10g} V, not the "
                                           rf"{codata_2018:.10g} V the netlists are written in \(kT/q of CODATA"):
        spice.simulate_field(out, 0, np.zeros((1, 8)))


def test_a_killed_ngspice_is_named_as_such(tmp_path, monkeypatch):
    # killed (by the out-of-memory killer, say), ngspice writes nothing: the error read "(exit -9): "
    out = emitted(random_graph("all_on", seed=4), tmp_path / "out")
    fake = tmp_path / "bin" / "ngspice"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nkill -9 $$\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(CrystalError, match=r"^ngspice failed on neuron_field_b0.sp \(killed by SIGKILL, signal 9\)$"):
        spice.simulate_field(out, 0, np.zeros((1, 8)))


@pytest.mark.tool
@pytest.mark.parametrize("frozen_only", [False, True])
def test_a_field_wider_than_ngspice_instances(tmp_path, frozen_only):
    # ngspice-39 instances a subcircuit of at most 1004 ports ("N_GLOBAL_NODES overflow"), and a field's has 2D
    # (2D + 1 for a frozen core): D = 503 (502) did not load. The testbench holds the body at its top level;
    # the netlist is still the subcircuit, and says so
    d = 502 if frozen_only else 503
    g = random_graph(dict(vocab_size=5, d_model=d, n_ctx=2, n_heads=1, n_blocks=1, n_neurons=2, ffn_hidden=4),
                     seed=1)
    if frozen_only:
        g = g.map_tensors(lambda t: type(t)(t.name, np.ones_like(t.data)) if t.name.endswith(".frozen") else t)
    out = tmp_path / "out"
    out.mkdir()
    spice.BACKEND.emit(g, out, frozen_only=frozen_only)
    text = (out / spice.netlist_name(0)).read_text()
    ports = 2 * d + frozen_only
    assert spice._ports(out / spice.netlist_name(0)).d == d and f"* {ports} ports: ngspice-39 instances" in text
    op = g.blocks[0].field
    check_field(out, 0, op, np.concatenate([np.zeros((1, d), np.float32), near_neurons(op, seed=1)]))


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
    for b, h in enumerate(field_inputs(g, ids)):  # the field itself: the sums, and the digital side's part
        op = g.blocks[b].field
        if np.count_nonzero(op.frozen.data):
            check_field(out, b, op, np.concatenate([h, near_neurons(op, seed=b)]))
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


def test_forward_refuses_a_folder_compiled_from_another_model(tmp_path):
    # a folder runs only with the fields it was compiled from: under a changed frozen mask a frozen core's
    # logits were 0.135 off, with another model of the same shape 0.67, silently
    g = random_graph("d40_h5", seed=2)
    whole, core = emitted(g, tmp_path / "whole"), tmp_path / "core"
    core.mkdir()
    spice.BACKEND.emit(g, core, frozen_only=True)
    op = g.blocks[0].field

    def changed(name: str, data: np.ndarray) -> Graph:
        return g.map_tensors(lambda t: type(t)(t.name, data) if t.name == f"blocks.0.field.{name}" else t)

    active = ~np.asarray(op.frozen.data, dtype=bool)
    moved = np.where(active[:, None], op.positions.values() + 0.5, op.positions.values()).astype(np.float32)
    eps = random_graph({**FIXTURE_SHAPES["d40_h5"], "field_eps": 1e-6}, seed=2)
    other = random_graph("d40_h5", seed=9).map_tensors(  # another model, frozen as this one is
        lambda t: type(t)(t.name, op.frozen.data) if t.name == "blocks.0.field.frozen" else t)
    cases = [(core, changed("frozen", np.ones_like(active)), "frozen mask"),
             (core, other, "positions, values, temperatures"),
             (whole, random_graph("d40_h5", seed=9), "frozen mask, positions, values, temperatures"),
             (whole, changed("frozen", active), "frozen mask"),
             (whole, changed("positions", moved), "positions"),
             (whole, eps, "field_eps")]
    for out, graph, says in cases:
        with pytest.raises(CrystalError, match=f"^neuron_field_b0.sp was compiled from another field than block "
                                               f"0's \\(not the same {says}\\): compile the model again") as raised:
            spice.forward(graph, out, [1, 2])
        assert "\n" not in str(raised.value)
    assert spice.check_compiled_from(changed("positions", moved), core)  # the active neurons are digital
    netlist = whole / spice.netlist_name(0)
    netlist.write_text(re.sub(r"^\* crystalc fingerprint:.*\n", "", netlist.read_text(), flags=re.MULTILINE))
    with pytest.raises(CrystalError, match="holds no crystalc fingerprint line"):
        spice.forward(g, whole, [1, 2])
    three = random_graph("three_blocks_n0_n1", seed=2)
    out = emitted(three, tmp_path / "three")
    for name, says in (("neuron_field_b0.sp", "is for block 0, which has no neurons"),
                       ("neuron_field_b3.sp", "is for block 3, and the model has 3 blocks")):
        shutil.copy(out / spice.netlist_name(1), out / name)
        with pytest.raises(CrystalError, match=f"^{name} {says}: .* was compiled from another model$"):
            spice.forward(three, out, [1, 2])
        (out / name).unlink()
    assert not spice.check_compiled_from(three, out)


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
