"""The SPICE backend: each block's neuron field as an analog circuit, simulated by ngspice.

The seeds' hybrid design puts the crystallised neurons in analog hardware and the
rest in digital; this target compiles the op that is made of neurons, the
`neuron_field`, one subcircuit per block (`neuron_field_b<b>`), and leaves the
other ops to a digital target (here, the reference interpreter: `forward`).

Decisions taken here (templates/spice/ only renders text):

- The exponential is physical: a diode's current IS * (exp(V / Vt) - 1), driven at
  V = (A - a_j) Vt with a_j = |h - pos_j| / (|tau_j| + 0.1), carries
  IS * exp(A) * exp(-a_j). A = 42 and IS = 1e-21 A put the nearest possible
  neuron (a_j = 0) at 1.09 V and 1.7 mA; neurons beyond A temperatures carry
  -IS, which next to IS * exp(A) is 6e-19 of a weight, and next to the eps
  current of a normalised field is what `far_field_error` bounds: emit refuses
  a field_eps too small for it (eps = 0 among them), judged against the largest
  |value| (an output's scale: the bound, and float32's rounding, scale with the
  values).
- Vt is what ngspice computes at 27 C, from its own constants (Boltzmann
  1.38064852e-23 J/K, charge 1.6021766208e-19 C), so the diode's exponent is
  the intended one to a few ulp (with every number read as written, below: the
  circuit matches its own equations to 6e-15); the options pin 27 C and ngspice
  runs with -n, so that no .spiceinit of the user's changes the temperature (or
  anything else). Those are ngspice 39's constants (CODATA 2014), not a law: every
  run checks them, by a diode of the netlist's model driven at A Vt beside the
  circuit (THERMAL_CHECK), and an ngspice of other constants is refused, not
  trusted with fields that would be off by millionths.
- Each position is solved by its own ngspice run, in parallel: one circuit of S
  instances took ngspice time growing far faster than S (the bundled model's
  field: 3.3 s for one position, 241 s for eight). A run is a process, not
  PySpice's shared library, whose failures are the host's (docs/backends.md);
  it prints 17 significant digits, which give back the double it solved.
- The testbench holds the netlist's body at its top level, not an instance of the
  subcircuit: ngspice-39 instances a subcircuit of at most 1004 ports
  (N_GLOBAL_NODES), and this one has 2D (2D + 1 for a frozen core), so a model of
  D >= 503 did not load. The netlist stays a .subckt, the artifact to place.
- ngspice puts GMIN (default 1e-12 S) beside every junction; the eps current is
  1.7e-11 A, so GMIN would leak 4% of it. The testbench sets GMIN to 1e-30 and
  solves to a relative tolerance of 1e-12.
- The square root reads |sq_j|: the squared distance is never negative, but
  Newton's first iterates make it so wherever h is nearer pos_j than the
  origin is, and ngspice then stops on sqrt's domain (h on a neuron, D = 1).
- Squares, square roots and the final division are ideal behavioural sources (B
  elements: analog multipliers and dividers at block level); sums are currents
  into a node (Kirchhoff), the val_jk weighting current mirrors (F elements).
  A square is x**2, which names its position once: x*x with each position
  written in two parts (below) took 31% longer to simulate (D 128, N 320).
- Every neuron is in the circuit, marked frozen or active in a comment; under
  frozen_only (the frozen core of a hybrid, SpiceBackend.emit) only the frozen
  ones are, and the active ones are computed digitally (`forward`). Values are
  the graph's float32 weights (dequantized when quantized) and doubles computed
  from them, each written as the shortest string that is that double (repr), so
  that ngspice, which reads doubles, gets the value itself (to an ulp: its reader
  is not correctly rounded), not a float32's 9-digit neighbour, 5e-10 away. Inside
  a B source's expression ngspice's front end rewrites every number with 11
  significant digits (inp_modify_exp, "%18.10e"): there a number is written as
  its 11-digit head plus the remainder, which the rewrite keeps to 1e-21 of it.
- A neuron's drive reads its scaled distance capped at 2A: GMIN sits beside every
  junction, and at an input far from every neuron (1e30) the uncapped drive,
  -1e30 V, made GMIN x V the current, the output a wrong number; capped, a
  diode's reverse voltage is at most A Vt, and GMIN's share of its -IS is 1e-9.
- Each netlist carries a fingerprint of the field it was compiled from (the
  frozen mask, the positions, values and temperatures of the neurons in it, and
  for a whole field eps and the normalisation): `forward` refuses a graph whose
  field differs, rather than adding a circuit of another model to its digital ops.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import field_temperatures, neuron_field
from crystalc.ir.interpret import forward as interpret_forward
from crystalc.ir.ops import NeuronField
from crystalc.templating import render

DRIVE_A = 42.0  # the diode's drive for a neuron at distance 0, in thermal voltages
DIODE_IS = 1e-21  # A
THERMAL_VOLTAGE = 1.38064852e-23 * 300.15 / 1.6021766208e-19  # ngspice's kT/q at 27 C
GMIN = 1e-30  # S, beside every junction (ngspice's default 1e-12 would leak 4% of the eps current)
OPTIONS = f"reltol=1e-12 abstol=1e-24 vntol=1e-15 gmin={GMIN:g} temp=27 tnom=27"
# An output's error from the diodes' -IS that emit accepts, of the largest |value| (which bounds a normalised
# field's outputs): below float32's rounding
FAR_ERROR_MAX = 1e-7
# What a diode carries at most instead of nearly nothing, in units of IS: its -IS, and GMIN times its reverse
# voltage, at most A Vt (the drive's cap)
LEAK_IS = 1.0 + GMIN * DRIVE_A * THERMAL_VOLTAGE / DIODE_IS
# A B source divides by its divisor plus GMIN x 1e-20 (ngspice's PTdivide), so that 1/0 is 1e50 here, and
# ngspice exits 0; no output of a field of float32 values comes near (a normalised one is at most the largest
# |value|, a sum at most N of them)
INFINITE_V = 1e49
FINGERPRINT = "* crystalc fingerprint:"
# The check diode's current, of IS (exp(A) - 1), may be this far from 1: ngspice reads the drive to an ulp and
# the exponent carries it A-fold (seen 2e-14); CODATA 2018's constants against 2014's move it by 1.5e-5
THERMAL_CHECK = 1e-9
NGSPICE_MAX_PORTS = 1004  # the most ports ngspice-39 instances a subcircuit with (N_GLOBAL_NODES overflow past it)


def _num(x: float) -> str:
    """A number as ngspice reads it into a double: the shortest string that is the double (repr)."""
    return repr(float(x))


def _bnum(x: float) -> str:
    """A number inside a B source's expression: ngspice rewrites each number there to 11 significant digits
    (inpcom.c, inp_modify_exp), so a double is its 11-digit head plus the remainder (the rewrite keeps that to
    1e-21 of the double; the sum is within an ulp of it). A sum: the template parenthesises it."""
    x = float(x)
    head = float(f"{x:.10e}")
    rest = float(f"{x - head:.10e}")  # x - head is exact (Sterbenz); 11 digits of it are all ngspice keeps
    return _num(head) if rest == 0 else f"{head!r}{'+' if rest > 0 else '-'}{abs(rest)!r}"


def netlist_name(block: int) -> str:
    return f"neuron_field_b{block}.sp"


def _far_field_current(op: NeuronField) -> float:
    """The most the diodes' leaks (-IS, and GMIN's share: LEAK_IS of IS each) can move an output, times the
    denominator it is read against, in units of IS exp(A): sum_j |val_jk| leaks into output k's numerator
    and, normalised, n leaks into the denominator, which moves output k (at most max_j |val_jk|) by n of
    them; the largest over k."""
    if op.n_neurons == 0:
        return 0.0
    val = np.abs(op.values.values().astype(np.float64))
    spread = val.sum(axis=0) + (op.n_neurons * val.max(axis=0) if op.normalize else 0.0)
    return float(spread.max()) * LEAK_IS * math.exp(-DRIVE_A)


def far_field_error(op: NeuronField) -> float:
    """The most an output can be off by the diodes' leaks (_far_field_current): a normalised field's are read
    against its denominator, at least the eps current eps IS exp(A) (its worst case: every neuron beyond A
    temperatures), an unnormalised one's against IS exp(A) itself (3e-18 of a unit of value)."""
    if not op.normalize:
        return _far_field_current(op)
    return math.inf if op.eps == 0 else _far_field_current(op) / op.eps


def fingerprint(op: NeuronField, frozen_only: bool) -> dict[str, str]:
    """What a netlist of `op` is compiled from, by name, each array as the start of its SHA-256: the frozen
    mask, the positions, values and |tau| + 0.1 of the neurons in the circuit (a frozen core's active
    neurons are digital, and may go on training), and for a whole field eps and the normalisation (a frozen
    core's are applied digitally)."""
    frozen = np.asarray(op.frozen.data, dtype=bool)
    inside = frozen if frozen_only else np.ones_like(frozen)

    def digest(a: np.ndarray) -> str:
        a = np.ascontiguousarray(a)
        return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()[:16]

    parts = {"frozen": digest(frozen.astype(np.uint8)),
             "positions": digest(op.positions.values()[inside].astype("<f4")),
             "values": digest(op.values.values()[inside].astype("<f4")),
             "temperatures": digest(field_temperatures(op)[inside].astype("<f4"))}
    if not frozen_only:
        parts |= {"field_eps": repr(float(op.eps)), "field_norm": str(bool(op.normalize)).lower()}
    return parts


def lower_field(graph: Graph, block: int, frozen_only: bool = False) -> dict[str, Any]:
    """The template context of block `block`'s neuron field (its frozen neurons only, when frozen_only)."""
    f = graph.blocks[block].field
    pos, val, t = f.positions.values(), f.values.values(), field_temperatures(f)
    frozen = np.asarray(f.frozen.data, dtype=bool)
    scale = DIODE_IS * math.exp(DRIVE_A)
    neurons = [{
        "j": j, "frozen": bool(frozen[j]), "t": _num(t[j]), "vt_over_t": _bnum(THERMAL_VOLTAGE / float(t[j])),
        "pos": [_bnum(v) for v in pos[j]], "val": [_num(v) for v in val[j]],
    } for j in range(f.n_neurons) if frozen[j] or not frozen_only]
    return {
        "block": block, "d": graph.config.d_model, "neurons": neurons, "n_frozen": int(frozen.sum()),
        "n_digital": f.n_neurons - len(neurons),
        "n_total": f.n_neurons, "partial": frozen_only,
        "n_ports": 2 * graph.config.d_model + frozen_only, "max_ports": NGSPICE_MAX_PORTS,
        "normalize": f.normalize, "eps_current": _num(f.eps * scale), "inv_scale": _bnum(1.0 / scale),
        "a_vt": _bnum(DRIVE_A * THERMAL_VOLTAGE), "a_vt_cap": _bnum(2 * DRIVE_A * THERMAL_VOLTAGE),
        "diode_is": _num(DIODE_IS), "drive_a": f"{DRIVE_A:g}", "vt": f"{THERMAL_VOLTAGE:.9g}",
        "fingerprint_line": " ".join([FINGERPRINT, *(f"{k}={v}" for k, v in fingerprint(f, frozen_only).items())]),
        "summary": f"|tau| + 0.1 from {float(t.min()):.4g} to {float(t.max()):.4g}" if f.n_neurons else "",
    }


class SpiceBackend:
    name = "spice"

    def emit(self, graph: Graph, out_dir: Path, *, frozen_only: bool = False) -> list[Path]:
        """Write neuron_field_b<b>.sp for every block with neurons into out_dir.

        frozen_only: the seeds' hybrid, only the frozen (crystallised) neurons in the circuit, which
        then outputs its sums (f<k> and fden) for the digital side to add the active neurons to."""
        graph.verify()
        blocks = [b for b, blk in enumerate(graph.blocks)
                  if (np.count_nonzero(blk.field.frozen.data) if frozen_only else blk.field.n_neurons)]
        if not blocks:
            what = "frozen neurons" if frozen_only else "neurons"
            raise CrystalError(f"the SPICE target compiles neuron fields, and no block has {what}")
        for b in blocks:
            op = graph.blocks[b].field
            # Relative, as the leaks and float32's rounding are: an absolute bound refused a good field's values
            # x1000 and let values of 1e-3 be 1.65e-5 off. An unnormalised field's leaks are at most
            # N LEAK_IS e^-A (5.8e-19 N) of its largest |value|, and eps is not in it: only a normalised field
            # can fail. Every value 0: every output is 0, whatever the leaks.
            largest = float(np.abs(op.values.values()).max(initial=0.0))
            if op.normalize and largest > 0 and far_field_error(op) > FAR_ERROR_MAX * largest:
                # the eps at which far_field_error reaches the most, rounded up so that the eps named is accepted
                need = _far_field_current(op) / (FAR_ERROR_MAX * largest)
                step = 10.0 ** (math.floor(math.log10(need)) - 1)
                raise CrystalError(f"field_eps {op.eps:g} is too small for the SPICE circuit of block {b}: its "
                                   f"diodes carry -IS beyond {DRIVE_A:g} temperatures, and only an eps current of "
                                   f"field_eps >= {math.ceil(need / step) * step:.2g} keeps that below "
                                   f"{FAR_ERROR_MAX:g} of the largest |value| ({largest:.3g})")
        written = []
        for b in blocks:
            path = Path(out_dir) / netlist_name(b)
            path.write_text(render("spice", "neuron_field.sp.j2", **lower_field(graph, b, frozen_only)),
                            encoding="ascii")
            written.append(path)
        return written

    def build(self, out_dir: Path) -> Path:
        """Solve every netlist once in ngspice (all inputs 0) and write the results to check.log."""
        out_dir = Path(out_dir)
        lines = []
        for block, path in _netlists(out_dir).items():
            ports = _ports(path)
            out = simulate_field(out_dir, block, np.zeros((1, ports.d)))
            what = "f, fden" if ports.frozen_core else "f"
            lines.append(f"{path.name}: {what} at h = 0: {' '.join(_num(v) for v in out[0])}")
        log = out_dir / "check.log"
        log.write_text("\n".join(lines) + "\n")
        return log


class Ports(NamedTuple):
    """A netlist's subcircuit ports, as its .subckt line names them: h0..h<D-1>, f0..f<D-1>, and fden for a
    frozen core."""

    d: int
    outputs: list[str]  # the output ports without their f: "0".."D-1", then "den" for a frozen core

    @property
    def frozen_core(self) -> bool:
        """Whether the netlist was compiled with --frozen-only (it outputs the sums, fden among them)."""
        return self.outputs[-1:] == ["den"]


def _netlists(out_dir: Path) -> dict[int, Path]:
    """out_dir's netlists (netlist_name's neuron_field_b<b>.sp) by block, in block order; none is an error."""
    prefix = netlist_name(0).removesuffix("0.sp")
    found = {int(p.stem.removeprefix(prefix)): p for p in Path(out_dir).glob(f"{prefix}*.sp")
             if p.stem.removeprefix(prefix).isdigit()}
    if not found:
        raise CrystalError(f"{out_dir} holds no neuron_field netlist: compile the model with --target spice")
    return dict(sorted(found.items()))


def _ports(netlist: Path) -> Ports:
    """The ports of the netlist's .subckt line, the one place it is read (what emit writes: h<k> in, f<k> out,
    and fden for a frozen core)."""
    try:
        text = netlist.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise CrystalError(f"{netlist}: cannot read it: {e}") from None
    found = re.search(r"^\.subckt \S+ (.*)$", text, re.MULTILINE)
    if found is None:
        raise CrystalError(f"{netlist} holds no .subckt line")
    ports = found.group(1).split()
    d = sum(p.startswith("h") for p in ports)
    outputs = [str(k) for k in range(d)] + (["den"] if len(ports) == 2 * d + 1 else [])
    if ports != [f"h{k}" for k in range(d)] + [f"f{o}" for o in outputs]:
        raise CrystalError(f"{netlist}: its .subckt ports are not h0..h<D-1>, f0..f<D-1> (and fden): "
                           f"{' '.join(ports)[:200]}")
    return Ports(d, outputs)


def _body(netlist: Path) -> str:
    """The netlist without its .subckt and .ends lines, for the testbench's top level: ngspice-39 instances a
    subcircuit of at most NGSPICE_MAX_PORTS, and a field's has 2D (2D + 1), over that from D = 503 (502)."""
    return re.sub(r"^\.(subckt|ends)\b.*\n?", "", netlist.read_text(encoding="ascii"),
                  flags=re.MULTILINE | re.IGNORECASE)


def _killed_by(number: int) -> str:
    try:
        return f"killed by {signal.Signals(number).name}, signal {number}"
    except ValueError:  # a real-time signal between SIGRTMIN and SIGRTMAX, which Signals does not name
        return f"killed by signal {number}"


def _check_thermal_voltage(source_current: float) -> None:
    """That ngspice's kT/q is THERMAL_VOLTAGE, from the check diode's current (the testbench's Vthermal carries
    it, negative: into the source's + node); the netlists' drives are written in it."""
    drive = DRIVE_A * THERMAL_VOLTAGE
    current = -source_current
    if abs(current / (DIODE_IS * math.expm1(DRIVE_A)) - 1.0) <= THERMAL_CHECK:
        return
    vt = drive / math.log1p(current / DIODE_IS) if current > 0 else math.nan
    raise CrystalError(f"this ngspice's thermal voltage at 27 C is {vt:.10g} V, not the {THERMAL_VOLTAGE:.10g} V "
                       f"the netlists are written in (kT/q of CODATA 2014, as ngspice 39 has it): its fields would "
                       f"be off; simulate with an ngspice of those constants")


def simulate_field(out_dir: Path, block: int, h: np.ndarray, timeout: float | None = 600) -> np.ndarray:
    """Block `block`'s field at the inputs h [S, D], by ngspice's operating point: [S, D] float64
    (a frozen core: [S, D + 1], its sums f<k> and then fden). Each row is its own ngspice run (timeout
    each), as many at once as there are CPUs."""
    if shutil.which("ngspice") is None:
        raise CrystalError("simulating SPICE needs 'ngspice', which is not on PATH")
    netlist = (Path(out_dir) / netlist_name(block)).resolve()
    if not netlist.is_file():
        raise CrystalError(f"{netlist} does not exist: compile with --target spice first")
    h = np.asarray(h, dtype=np.float64)
    d, outputs = _ports(netlist)
    if h.ndim != 2 or h.shape[1] != d:
        raise CrystalError(f"{netlist.name} takes inputs of width {d}, got an array of shape {list(h.shape)}")
    if not np.isfinite(h).all():
        raise CrystalError(f"{netlist.name}: an input is not finite (row {int(np.argmin(np.isfinite(h).all(1)))})")
    big = np.abs(h) > np.finfo(np.float32).max  # no float32 model's layer_norm makes one; ngspice's numbers fail
    if big.any():
        raise CrystalError(f"{netlist.name}: an input is beyond float32's range (row {int(np.argmax(big.any(1)))})")
    if len(h) == 0:
        return np.zeros((0, len(outputs)))

    body = f"body_b{block}.cir"

    def solve(tmp: str, s: int, row: np.ndarray) -> list[float]:
        bench = Path(tmp) / f"bench{s}.cir"
        bench.write_text(render("spice", "testbench.cir.j2", block=block, body=body, d=d, outputs=outputs,
                                max_ports=NGSPICE_MAX_PORTS, options=OPTIONS, h=[_num(v) for v in row],
                                thermal_drive=_num(DRIVE_A * THERMAL_VOLTAGE)),
                         encoding="ascii")
        try:
            proc = subprocess.run(["ngspice", "-n", "-b", bench.name], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise CrystalError(f"ngspice did not finish {netlist.name} within {timeout:g} s") from e
        found = dict(re.findall(r"^v\(f(\w+)\) = (\S+)$", proc.stdout, re.MULTILINE))
        thermal = re.findall(r"^i\(vthermal\) = (\S+)$", proc.stdout, re.MULTILINE)
        if proc.returncode != 0 or sorted(found) != sorted(outputs) or len(thermal) != 1:
            said = list(dict.fromkeys(ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()))
            why = [ln for ln in said if re.search(r"error|fail|singular|abort", ln, re.IGNORECASE)] or said
            detail = " ".join(" ".join(why).split())  # each line once: ngspice repeats its complaints
            detail = detail if len(detail) <= 1500 else detail[:1500] + " ..."  # from the first, whole
            # killed (the out-of-memory killer's SIGKILL among them), ngspice says nothing: the signal is the cause
            how = _killed_by(-proc.returncode) if proc.returncode < 0 else f"exit {proc.returncode}"
            raise CrystalError(f"ngspice failed on {netlist.name} ({how}){': ' + detail if detail else ''}")
        _check_thermal_voltage(float(thermal[0]))
        got = [float(found[o]) for o in outputs]
        # ngspice stands 1e50 in for a division by zero (INFINITE_V) and exits 0: that, or no number, is no
        # solution
        bad = [f"f{o} = {found[o]}" for o, v in zip(outputs, got, strict=True)
               if not math.isfinite(v) or abs(v) >= INFINITE_V]
        if bad:
            raise CrystalError(f"ngspice gave no finite solution of {netlist.name} at input row {s}: "
                               f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
        return got

    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(max_workers=min(len(h), os.cpu_count() or 1)) as pool:
        # once; .include by a plain name: paths may hold spaces
        (Path(tmp) / body).write_text(_body(netlist), encoding="ascii")
        return np.array(list(pool.map(lambda sr: solve(tmp, *sr), enumerate(h))))


def _with_active_neurons(op: NeuronField, h: np.ndarray, core: np.ndarray) -> np.ndarray:
    """The whole field from a frozen core's sums [S, D + 1] and the active neurons, computed here."""
    active = ~np.asarray(op.frozen.data, dtype=bool)
    pos = op.positions.values()[active].astype(np.float64)
    val = op.values.values()[active].astype(np.float64)
    dist = np.sqrt(((h[:, None, :].astype(np.float64) - pos[None]) ** 2).sum(axis=-1))
    w = np.exp(-dist / field_temperatures(op)[active].astype(np.float64))
    num = core[:, :-1] + w @ val
    if op.normalize:
        return num / (core[:, -1] + w.sum(axis=1) + op.eps)[:, None]
    return num


def _frozen_core(out_dir: Path) -> bool:
    """Whether out_dir was compiled with --frozen-only: its subcircuits then have the port fden."""
    return _ports(next(iter(_netlists(out_dir).values()))).frozen_core


def _read_fingerprint(netlist: Path) -> dict[str, str]:
    """The fingerprint line emit writes into a netlist, by name."""
    found = re.search(rf"^{re.escape(FINGERPRINT)} (.*)$", netlist.read_text(encoding="ascii"), re.MULTILINE)
    if found is None:
        raise CrystalError(f"{netlist} holds no crystalc fingerprint line (written by an older crystalc?): "
                           f"compile the model again with --target spice")
    return dict(part.partition("=")[::2] for part in found.group(1).split())


def check_compiled_from(graph: Graph, out_dir: Path) -> bool:
    """That out_dir's netlists were compiled from graph's fields: one for every block with neurons in the
    circuit (frozen ones, for a frozen core), none for another, each with the fingerprint of its block's
    field. Returns whether out_dir is a frozen core. Any mismatch is one CrystalError naming it."""
    netlists, frozen_core = _netlists(out_dir), _frozen_core(out_dir)
    what = "frozen neurons" if frozen_core else "neurons"
    for b, extra in netlists.items():
        if b >= len(graph.blocks):
            raise CrystalError(f"{extra.name} is for block {b}, and the model has {len(graph.blocks)} blocks: "
                               f"{out_dir} was compiled from another model")
    for b, blk in enumerate(graph.blocks):
        op = blk.field
        in_circuit = np.count_nonzero(op.frozen.data) if frozen_core else op.n_neurons
        found = netlists.get(b)
        if not in_circuit:
            if found is not None:
                raise CrystalError(f"{found.name} is for block {b}, which has no {what}: {out_dir} was compiled "
                                   f"from another model")
            continue
        if found is None:
            raise CrystalError(f"{Path(out_dir) / netlist_name(b)} is missing: block {b} has {in_circuit} "
                               f"{what} for it")
        want, got = fingerprint(op, frozen_core), _read_fingerprint(found)
        differ = [k for k in want if got.get(k) != want[k]]
        if "frozen" in differ and frozen_core:
            differ = ["frozen"]  # the rest differ with it: the mask picks the neurons in the circuit
        if differ:
            names = ", ".join("frozen mask" if k == "frozen" else k for k in differ)
            raise CrystalError(f"{found.name} was compiled from another field than block {b}'s (not the same "
                               f"{names}): compile the model again with --target spice"
                               f"{' --frozen-only' if frozen_core else ''}")
    return frozen_core


def forward(graph: Graph, out_dir: Path, ids: Sequence[int]) -> np.ndarray:
    """Logits [S, V] with every neuron field computed by ngspice from out_dir's netlists (a frozen
    core's with the active neurons added here), the rest by the interpreter. The folder must have been
    compiled from graph (check_compiled_from): a missing netlist is an error, not a quiet digital field,
    and another model's circuit an error, not a quietly wrong one."""
    frozen_core = check_compiled_from(graph, out_dir)

    def field(block: int, op: NeuronField, h: np.ndarray) -> np.ndarray:
        if not (np.count_nonzero(op.frozen.data) if frozen_core else op.n_neurons):
            return neuron_field(op, h)  # no neurons, or (a frozen core) no frozen ones: all digital
        out = simulate_field(out_dir, block, h)
        if out.shape[1] > h.shape[1]:  # a frozen core's sums, fden last
            out = _with_active_neurons(op, h, out)
        return out.astype(np.float32)

    return interpret_forward(graph, ids, field_fn=field)


BACKEND = SpiceBackend()
