"""Fixed-point lowering for hardware targets, and its bit-exact emulator.

A graph becomes a *program*: a short list of instructions named after the IR
ops (`token_embedding`, `layer_norm`, `linear`, `causal_attention`,
`neuron_field`, `gelu`), a ROM of Q16.16 words (every weight) and a RAM
layout; the two lookup tables the nonlinearities use are constants of the
hardware (`EXP_TABLE`, `GELU_TABLE`). The Verilog core
(templates/verilog/crystal_core.v) executes that program one token at a time;
`emulate` below executes it in numpy with the same integer arithmetic, so the
simulated hardware must equal the emulator word for word, and the emulator is
held to the reference interpreter within a stated tolerance (docs/backends.md).

The arithmetic, defined once here and mirrored by the Verilog:

- Values are Q16.16 in 32 bits; products and sums are exact in 64 bits: signed sums within
  +-2^63, sums of squares (squared distances, D x variance) below 2^64. Past that the core's
  64-bit registers wrap, and so does this emulator (numpy's int64), so the two still agree
  word for word; neither then agrees with the float model.
- `rshift_round(a, s)` = (a + 2^(s-1)) >> s, the shift arithmetic (floor), so
  halves round up. `tdiv` truncates toward zero, as Verilog's signed `/` does.
  Every word written to RAM saturates to 32 bits (`sat32`), as do a score's dot product and a LayerNorm's
  normalised value before their multiplications; `emulate_run` says whether any saturation acted, as the
  core's `saturated` does: the words are then not the model's, however in range they look.
- exp(x) = 2^(x log2 e): the base-2 exponent y (Q24) splits into an integer n
  and a fraction f; 2^f (Q29) comes from a 257-entry table with linear
  interpolation, then shifts by n into a Q30 result (right shifts round; left
  ones saturate at EXP_CAP): relative error < 2e-6. Softmax and field weights
  are at most 1, so Q30 keeps 30 bits of them where Q16 would keep 16.
- GELU from a table on [-8, 8) at steps of 1/64 with linear interpolation;
  x beyond the table is x (right) or 0 (left): |GELU(x) - x| < 1e-14 there.
- sqrt is the exact floor integer square root.
- A quantized 2-D tensor's words are made of its codes in integers (`Codes`):
  rshift_round(code * multiplier, 16) + offset, the multiplier its scale in Q0.32;
  so a core may store the codes and make the words as it reads them.

Rewritings that keep the math but suit integers (the lowering's decisions):

- The neuron field's 1 / (|tau| + 0.1) is folded into one constant per neuron.
- The normalised field subtracts the smallest exponent a_min before exp, like
  softmax does: w_j = e^(-(a_j - a_min)) / (sum_k e^(-(a_k - a_min)) + eps e^(a_min)),
  the spec's w_j exactly; without it every weight underflows Q30 once the
  nearest neuron is ~21 temperatures away. eps e^(a_min) = exp(a_min - ln(1/eps)).
- The attention scale 1/sqrt(D/H) is one Q16 constant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.interpret import check_ids, field_temperatures
from crystalc.ir.ops import LayerNorm
from crystalc.ir.tensor import Tensor, read_only

FRAC = 16  # fractional bits of every stored value
ONE = 1 << FRAC
# but a field's 1/(|tau| + 0.1) (at most 10): a Q16 step there is off by up to 7.6e-6 of a neuron's distance,
# which a far field with large temperatures carried past the tolerance (2.7e-3 of logits near 3)
COEF_FRAC = 24
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
LOG2E_Q30 = round(math.log2(math.e) * (1 << 30))
EXP_LUT_BITS = 8  # 2^f table: 2^8 + 1 entries
EXP_LUT_FRAC = 29  # the table's entries (1..2) are Q29
EXP_Y_FRAC = 24  # the base-2 exponent is Q24: 8 bits index the table, 16 interpolate
EXP_FRAC = 30  # exp's results (softmax and field weights, at most 1 but for the eps term) are Q30
EXP_CAP = 1 << 60  # exp saturates here (only the field's eps term can get near)
GELU_LO = -8 * ONE  # table range [-8, 8)
GELU_STEP_BITS = 10  # 2^10 Q16 units = 1/64 between table entries
GELU_ENTRIES = (16 * ONE >> GELU_STEP_BITS) + 1

# An instruction is one program ROM word of 32 bits per field, `op` the lowest. What the fields
# hold (RAM addresses: dst, src, s; ROM addresses: a, b, c unless said):
#   token_embedding   dst = x; a, b = token_embed, pos_embed; n = D
#   layer_norm        dst, src; a, b = weight, bias; n = D; k = eps in Q32
#   linear            dst, src; a, b = weight [n, m], bias; flags ACCUMULATE, PER_POSITION. In the core's
#                     program (verilog.core_memories) k_proj and v_proj write a cache instead of the RAM:
#                     flags TO_KEYS or TO_VALUES in place of PER_POSITION, dst = the cache's base there,
#                     and for the values c = head width, k = head count
#   causal_attention  dst = y, src = q; a, b = key and value caches (RAM); c = head width; n = D;
#                     m = heads; s = scratch; k = 1/sqrt(head width) in Q16
#   neuron_field      dst = x (added to), src = h; a, b = positions, values; c = 1/(|tau|+0.1) per
#                     neuron; n = D; m = N; s = scratch; k = ln(1/eps) in Q16; flags NORMALIZE, HAS_EPS
#   gelu              dst = src = u; n = F
# and, for a tensor the lanes read as codes (set by verilog.core_memories; 0 otherwise), how to make
# words of them: qa/qb the packing (0 words, 1 int16 codes, 2 int8 codes), sa/sb the base of its
# multipliers in the lane scale ROM, pa/pb the words its scale pointer moves a pass, ga/gb the
# steps it stays on a word, oa/ob the offset (Q16); a for linear's weight and the field's
# positions, b for the field's values.
FIELDS = ("op", "dst", "src", "a", "b", "c", "n", "m", "s", "k", "flags",
          "qa", "sa", "pa", "ga", "oa", "qb", "sb", "pb", "gb", "ob")
OPCODES = {"halt": 0, "token_embedding": 1, "layer_norm": 2, "linear": 3, "causal_attention": 4,
           "neuron_field": 5, "gelu": 6}
# linear flags (a flag is one bit; verilog.encoding writes each one's bit index into model.vh for the core)
ACCUMULATE = 1  # dst += W src + b (a residual connection) instead of dst = ...
PER_POSITION = 2  # dst is a [T, rows] table; the row of the current position is written (the KV caches)
TO_KEYS = 4  # the core's only (set by verilog.core_memories): the row goes into the key cache at dst
TO_VALUES = 8  # the core's only: the row goes into the value cache at dst, as k heads of width c
# neuron_field flags
NORMALIZE = 1
HAS_EPS = 2


# --- the integer arithmetic -------------------------------------------------------------

def rshift_round(a: np.ndarray | int, s: np.ndarray | int) -> np.ndarray | int:
    return (a + (1 << (s - 1))) >> s


def tdiv(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray | int:
    """Integer division truncating toward zero (Verilog's signed `/`)."""
    # the floor's quotient moved up a step, not |a| // |b|: |INT64_MIN| overflows int64, and the core's 65-bit
    # divider gives -2^63 / 2^32 = -2^31 (an attention numerator of 4 equal scores on values at -32768)
    q = np.floor_divide(a, b)
    inexact = np.remainder(a, b) != 0
    return np.where(inexact & ((np.asarray(a) < 0) != (np.asarray(b) < 0)), q + 1, q)


def sat32(a: np.ndarray | int) -> np.ndarray:
    return np.clip(np.asarray(a, dtype=np.int64), INT32_MIN, INT32_MAX)


def isqrt(a: np.ndarray) -> np.ndarray:
    """floor(sqrt) of 64-bit words read as unsigned, as the core's square root reads them: a sum of squares
    in [2^63, 2^64) is a negative int64 here and a right answer there."""
    words = (int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in np.asarray(a).ravel())
    return np.array([math.isqrt(w) for w in words], dtype=np.int64).reshape(np.shape(a))


def exp_lut() -> np.ndarray:
    """2^(i / 256) in Q29, i = 0..256."""
    i = np.arange((1 << EXP_LUT_BITS) + 1, dtype=np.float64)
    return np.round(np.exp2(i / (1 << EXP_LUT_BITS)) * (1 << EXP_LUT_FRAC)).astype(np.int64)


def gelu_lut() -> np.ndarray:
    """GELU(-8 + i / 64) in Q16 (exact erf form), i = 0..1024."""
    x = GELU_LO / ONE + np.arange(GELU_ENTRIES, dtype=np.float64) / (ONE >> GELU_STEP_BITS)
    g = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in x])
    return np.round(g * ONE).astype(np.int64)


EXP_TABLE = exp_lut()
GELU_TABLE = gelu_lut()


def exp_q30(x: np.ndarray) -> np.ndarray:
    """exp of Q16 values (int64) in Q30, as the hardware computes it."""
    x = np.asarray(x, dtype=np.int64)
    y = rshift_round(x * LOG2E_Q30, FRAC + 30 - EXP_Y_FRAC)  # the exponent in base 2, Q24
    n = y >> EXP_Y_FRAC
    f = y & ((1 << EXP_Y_FRAC) - 1)
    t_bits = EXP_Y_FRAC - EXP_LUT_BITS
    i = f >> t_bits
    t = f & ((1 << t_bits) - 1)
    lo, hi = EXP_TABLE[i], EXP_TABLE[i + 1]
    base = lo + rshift_round((hi - lo) * t, t_bits)  # 2^f, Q29
    sh = n + (EXP_FRAC - EXP_LUT_FRAC)  # 2^n 2^f in Q30
    left = np.where(sh > 31, EXP_CAP, np.minimum(base << np.clip(sh, 0, 31), EXP_CAP))
    right = np.where(-sh >= 63, 0, rshift_round(base, np.clip(-sh, 1, 62)))
    return np.where(sh >= 0, left, right)


def gelu_q16(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    u = np.clip(x - GELU_LO, 0, 16 * ONE - 1)
    i = u >> GELU_STEP_BITS
    t = u & ((1 << GELU_STEP_BITS) - 1)
    lo, hi = GELU_TABLE[i], GELU_TABLE[i + 1]
    inside = lo + rshift_round((hi - lo) * t, GELU_STEP_BITS)
    return np.where(x >= -GELU_LO, x, np.where(x < GELU_LO, 0, inside))


def to_q16(name: str, values: np.ndarray) -> np.ndarray:
    """float32 -> Q16.16 words, nearest; refuses what does not fit (|x| >= 32768)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size and float(np.max(np.abs(v))) >= (1 << (31 - FRAC)):
        raise CrystalError(f"{name}: a value of {float(np.max(np.abs(v))):g} does not fit Q16.16 (|x| < 32768)")
    return np.round(v * ONE).astype(np.int64)


MULT_FRAC = 32  # a code's multiplier is its scale in Q0.32: below 1, so 32 bits unsigned


@dataclass(frozen=True)
class Codes:
    """A quantized 2-D tensor as hardware can hold it: its integer codes, and how they become words.

    word = rshift_round(code * mult, MULT_FRAC - FRAC) + offset, where mult = round(scale * 2^32) is
    the code's scale in Q0.32 and offset its Q16 offset, the same for every code (nonzero only under
    the tensor scheme). So a core can store the codes (4 or 2 a 32-bit word) and make each word as it
    reads it; the emulator's ROM holds the words, so both compute the same numbers. The word is
    within one Q16 step of the dequantized value (the rounded scale errs by at most 2^-33 a code
    step, 2^-18 at the largest code, plus the word's own rounding)."""

    codes: np.ndarray  # int64 [rows, cols] (read-only, as mult)
    mult: np.ndarray  # int64 [rows, cols]: each code's multiplier
    offset: int
    bits: int  # 8 or 16
    scheme: str  # the IR's quantization scheme: tensor, row, group
    group: int

    def words(self) -> np.ndarray:
        return np.asarray(rshift_round(self.codes * self.mult, MULT_FRAC - FRAC)) + self.offset


def hardware_codes(t: Tensor) -> Codes | None:
    """The tensor as Codes, or None when it is not a quantized 2-D tensor whose scales are in [0, 1),
    offset is one value and words fit 32 bits (its words are then its values rounded to Q16)."""
    if t.quant is None or t.data.ndim != 2:
        return None
    scale, offset = t.quant.expanded(t.shape)
    if offset.size and not np.all(offset == offset.flat[0]):
        return None
    mult = np.round(np.asarray(scale, dtype=np.float64) * (1 << MULT_FRAC)).astype(np.int64)
    if mult.size and (mult.min() < 0 or mult.max() >= 1 << MULT_FRAC):
        return None
    off = float(offset.flat[0]) if offset.size else 0.0
    if abs(off) >= 1 << (31 - FRAC):
        return None
    codes = Codes(read_only(t.data.astype(np.int64)), read_only(mult), round(off * ONE), 8 * t.data.itemsize,
                  t.quant.scheme, t.quant.group)
    words = codes.words()
    if words.size and (words.min() < INT32_MIN or words.max() > INT32_MAX):
        return None
    return codes


# --- the program ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Instr:
    op: str
    dst: int = 0
    src: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    n: int = 0
    m: int = 0
    s: int = 0
    k: int = 0
    flags: int = 0
    qa: int = 0
    sa: int = 0
    pa: int = 0
    ga: int = 0
    oa: int = 0
    qb: int = 0
    sb: int = 0
    pb: int = 0
    gb: int = 0
    ob: int = 0
    note: str = ""  # where it came from, for the generated listing

    def word(self) -> int:
        """The instruction as one unsigned integer of 32 * len(FIELDS) bits."""
        value = 0
        for i, f in enumerate(FIELDS):
            v = OPCODES[self.op] if f == "op" else getattr(self, f)
            if not INT32_MIN <= v <= INT32_MAX:
                raise CrystalError(f"{self.note}: field {f} = {v} does not fit 32 bits")
            value |= (v & 0xFFFFFFFF) << (32 * i)
        return value


@dataclass(frozen=True)
class Program:
    """A lowered graph: what the core runs for each token, and the memories it runs on."""

    instrs: tuple[Instr, ...]
    rom: np.ndarray  # int64 words of 32 bits: Q16 values (read-only)
    rom_table: tuple[tuple[str, int, int], ...]  # (what, base, words), for the listing
    ram_words: int
    ram_table: tuple[tuple[str, int, int], ...]
    logits: int  # RAM base of the V logits
    vocab_size: int
    n_ctx: int
    summary: str = ""
    vocab_map: np.ndarray | None = None
    codes: Mapping[int, Codes] = field(default_factory=dict)  # ROM base -> the tensor's codes, when it has them

    def __post_init__(self) -> None:
        object.__setattr__(self, "codes", MappingProxyType(dict(self.codes)))  # as read-only as the arrays

    def verify(self) -> None:
        """What every consumer (the emulator, the Verilog memories) relies on: the program ends in halt and
        every instruction encodes; the memory tables tile the ROM and the RAM in order; the logits lie in
        the RAM; each tensor held as codes starts a ROM entry and covers its words."""
        if not self.instrs or self.instrs[-1].op != "halt":
            raise CrystalError("fixed-point program: it does not end in halt")
        for ins in self.instrs:
            ins.word()  # a known opcode, every field within 32 bits
        entries = tiling("fixed-point program", "ROM", self.rom_table, self.rom.size)
        tiling("fixed-point program", "RAM", self.ram_table, self.ram_words)
        if not 0 <= self.logits <= self.ram_words - self.vocab_size:
            raise CrystalError(f"fixed-point program: logits at {self.logits} do not fit the RAM")
        for base, coded in self.codes.items():
            if entries.get(base) != coded.codes.size:
                raise CrystalError(f"fixed-point program: codes at ROM {base} do not match an entry's words")


def tiling(owner: str, what: str, table: Sequence[tuple[str, int, int]], size: int) -> dict[int, int]:
    """Check that a memory's table (name, base, words) tiles its `size` words in order, with no gap: each
    consumer addresses a tensor by its entry. Returns base -> words."""
    ends = 0
    for name, base, n in table:
        if base != ends or n < 0:
            raise CrystalError(f"{owner}: {what} entry {name!r} at {base}, expected {ends}")
        ends = base + n
    if ends != size:
        raise CrystalError(f"{owner}: the {what} table covers {ends} of {size} words")
    return {base: n for _, base, n in table}


class _Memory:
    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.size = 0
        self.table: list[tuple[str, int, int]] = []

    def add(self, what: str, words: np.ndarray | int) -> int:
        arr = np.zeros(words, dtype=np.int64) if isinstance(words, int) else np.asarray(words, dtype=np.int64).ravel()
        base = self.size
        self.parts.append(arr)
        self.size += arr.size
        self.table.append((what, base, int(arr.size)))
        return base

    def words(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0, dtype=np.int64)


def lower(graph: Graph) -> Program:
    """The fixed-point program of a verified graph."""
    graph.verify()
    c = graph.config
    d, t, v = c.d_model, c.n_ctx, c.vocab_size
    rom, ram = _Memory(), _Memory()
    code: list[Instr] = []

    codes: dict[int, Codes] = {}

    def w(t_: Tensor) -> int:
        coded = hardware_codes(t_)
        if coded is None:
            return rom.add(t_.name, to_q16(t_.name, t_.values()))
        base = rom.add(t_.name, coded.words())
        codes[base] = coded
        return base

    eps_q32 = round(c.ln_eps * (1 << (2 * FRAC)))
    if eps_q32 > INT32_MAX:  # a smaller eps than Q32 holds (2.3e-10) rounds to 0: the root is clamped to >= 1
        raise CrystalError(f"ln_eps = {c.ln_eps:g} is too large for the hardware's Q32 (it must be below 0.5)")

    embed = w(graph.token_embed.weight)
    pos = w(graph.pos_embed.weight)

    x = ram.add("x: residual stream [D]", d)
    h = ram.add("h: normalised input of an op [D]", d)
    q = ram.add("q [D]", d)
    y = ram.add("y: attention output before out_proj [D]", d)
    u = ram.add("u: FFN hidden [F]", c.ffn_hidden)
    scratch = ram.add("scores / field exponents [max(T, N)]", max([t, *c.n_neurons]))

    def layer_norm(ln: LayerNorm, src: int, note: str) -> None:
        code.append(Instr("layer_norm", dst=h, src=src, a=w(ln.weight), b=w(ln.bias), n=d, k=eps_q32, note=note))

    def linear(weight: Tensor | int, bias: Tensor, dst: int, src: int, rows: int, cols: int, flags: int,
               note: str) -> None:
        wa = weight if isinstance(weight, int) else w(weight)
        code.append(Instr("linear", dst=dst, src=src, a=wa, b=w(bias), n=rows, m=cols, flags=flags, note=note))

    code.append(Instr("token_embedding", dst=x, a=embed, b=pos, n=d, note="x = token_embed[tok] + pos_embed[pos]"))
    hd = d // c.n_heads
    for i, blk in enumerate(graph.blocks):
        p = f"blocks.{i}"
        kc = ram.add(f"{p} key cache [T, D]", t * d)
        vc = ram.add(f"{p} value cache [T, D]", t * d)
        a = blk.attn
        layer_norm(blk.ln1, x, f"{p}.ln1")
        linear(a.q_weight, a.q_bias, q, h, d, d, 0, f"{p}.attn.q_proj")
        linear(a.k_weight, a.k_bias, kc, h, d, d, PER_POSITION, f"{p}.attn.k_proj -> key cache")
        linear(a.v_weight, a.v_bias, vc, h, d, d, PER_POSITION, f"{p}.attn.v_proj -> value cache")
        code.append(Instr("causal_attention", dst=y, src=q, a=kc, b=vc, c=hd, n=d, m=c.n_heads, s=scratch,
                          k=round(ONE / math.sqrt(hd)), note=f"{p}.attn: softmax(q k^T / sqrt({hd})) v"))
        linear(a.out_weight, a.out_bias, x, y, d, d, ACCUMULATE, f"{p}.attn.out_proj, x +=")
        f = blk.field
        if f.n_neurons:
            layer_norm(blk.ln2, x, f"{p}.ln2")
            coef = rom.add(f"{p}.field 1/(|temperature| + 0.1), Q8.24",
                           np.round(1.0 / field_temperatures(f).astype(np.float64) * (1 << COEF_FRAC)).astype(np.int64))
            flags = (NORMALIZE if f.normalize else 0) | (HAS_EPS if f.normalize and f.eps > 0 else 0)
            ln_inv_eps = round(-math.log(f.eps) * ONE) if flags & HAS_EPS else 0
            code.append(Instr("neuron_field", dst=x, src=h, a=w(f.positions), b=w(f.values), c=coef, n=d,
                              m=f.n_neurons, s=scratch, k=ln_inv_eps, flags=flags,
                              note=f"{p}.field: {f.n_neurons} neurons, x +="))
        layer_norm(blk.ln3, x, f"{p}.ln3")
        linear(blk.ffn.fc1_weight, blk.ffn.fc1_bias, u, h, c.ffn_hidden, d, 0, f"{p}.ffn.fc1")
        code.append(Instr("gelu", dst=u, src=u, n=c.ffn_hidden, note=f"{p}.ffn GELU"))
        linear(blk.ffn.fc2_weight, blk.ffn.fc2_bias, x, u, d, c.ffn_hidden, ACCUMULATE, f"{p}.ffn.fc2, x +=")
    src = x
    if graph.final_norm is not None:
        layer_norm(graph.final_norm, x, "ln_f")
        src = h
    logits = ram.add("logits [V]", v)
    head_w = embed if graph.head.weight is None else graph.head.weight
    linear(head_w, graph.head.bias, logits, src, v, d, 0, "head" + (" (tied to token_embed)" if
                                                                    graph.head.weight is None else ""))
    code.append(Instr("halt", note="logits ready"))

    program = Program(tuple(code), read_only(rom.words()), tuple(rom.table), ram.size, tuple(ram.table), logits, v, t,
                      c.summary(), None if graph.vocab_map is None else np.asarray(graph.vocab_map), codes)
    program.verify()
    return program


# --- the emulator ------------------------------------------------------------------------

def _exec(ins: Instr, rom: np.ndarray, ram: np.ndarray, tok: int, pos: int) -> bool:
    """Run one instruction; True when one of its saturations changed a value (the core's `clip`)."""
    clipped = False

    def clip32(a: np.ndarray | int) -> np.ndarray:  # sat32, noting whether it acted
        nonlocal clipped
        held = sat32(a)
        clipped = clipped or bool(np.any(held != np.asarray(a)))
        return held

    op = ins.op
    if op == "token_embedding":
        d = ins.n
        ram[ins.dst:ins.dst + d] = clip32(rom[ins.a + tok * d:ins.a + (tok + 1) * d] + rom[ins.b + pos * d:
                                                                                        ins.b + (pos + 1) * d])
    elif op == "layer_norm":
        d = ins.n
        xs = ram[ins.src:ins.src + d]
        mean = tdiv(np.sum(xs), d)
        dx = xs - mean
        # the 64-bit sum of squares, divided and rooted unsigned as the core does: exact below 2^64
        var = (int(np.sum(dx * dx)) & 0xFFFF_FFFF_FFFF_FFFF) // d
        r = max(math.isqrt((var + ins.k) & 0xFFFF_FFFF_FFFF_FFFF), 1)
        yv = clip32(tdiv(dx << FRAC, r))  # |y| <= sqrt(D): the saturation never acts, but bounds the multiplier
        ram[ins.dst:ins.dst + d] = clip32(rshift_round(yv * rom[ins.a:ins.a + d], FRAC) + rom[ins.b:ins.b + d])
    elif op == "linear":
        rows, cols = ins.n, ins.m
        wmat = rom[ins.a:ins.a + rows * cols].reshape(rows, cols)
        val = rshift_round(wmat @ ram[ins.src:ins.src + cols], FRAC) + rom[ins.b:ins.b + rows]
        dst = ins.dst + (pos * rows if ins.flags & PER_POSITION else 0)
        if ins.flags & ACCUMULATE:
            val = ram[dst:dst + rows] + val
        ram[dst:dst + rows] = clip32(val)
    elif op == "causal_attention":
        d, nh, hd = ins.n, ins.m, ins.c
        keys = ram[ins.a:ins.a + (pos + 1) * d].reshape(pos + 1, d)
        vals = ram[ins.b:ins.b + (pos + 1) * d].reshape(pos + 1, d)
        for hh in range(nh):
            part = slice(hh * hd, (hh + 1) * hd)
            dots = keys[:, part] @ ram[ins.src + hh * hd:ins.src + (hh + 1) * hd]
            scores = clip32(rshift_round(clip32(rshift_round(dots, FRAC)) * ins.k, FRAC))
            e = exp_q30(scores - scores.max())
            ram[ins.dst + hh * hd:ins.dst + (hh + 1) * hd] = clip32(tdiv(e @ vals[:, part], np.sum(e)))
    elif op == "neuron_field":
        d, n = ins.n, ins.m
        hv = ram[ins.src:ins.src + d]
        pts = rom[ins.a:ins.a + n * d].reshape(n, d)
        diff = hv[None, :] - pts
        dist = isqrt(np.sum(diff * diff, axis=1))
        a = clip32(rshift_round(dist * rom[ins.c:ins.c + n], COEF_FRAC))
        if ins.flags & NORMALIZE:
            amin = a.min()
            e = exp_q30(amin - a)
            den = np.sum(e) + (int(exp_q30(np.array(amin - ins.k))) if ins.flags & HAS_EPS else 0)
            out = tdiv(e @ rom[ins.b:ins.b + n * d].reshape(n, d), den)
        else:
            e = exp_q30(-a)
            out = rshift_round(e @ rom[ins.b:ins.b + n * d].reshape(n, d), EXP_FRAC)
        ram[ins.dst:ins.dst + d] = clip32(ram[ins.dst:ins.dst + d] + out)
    elif op == "gelu":
        ram[ins.dst:ins.dst + ins.n] = clip32(gelu_q16(ram[ins.src:ins.src + ins.n]))
    else:
        raise CrystalError(f"fixed-point program: unknown op {op!r}")
    return clipped


class Emulation(NamedTuple):
    logits: np.ndarray  # the last position's, Q16 integers
    saturated: bool  # a saturation changed a value at some position, the logits' own excepted (crystal_core's)


def emulate_run(program: Program, ids: Sequence[int]) -> Emulation:
    """The last position's logits for current-vocabulary ids, as the hardware computes them, and whether any
    position's run saturated a value, as the hardware says."""
    ids = check_ids(ids, program.n_ctx, program.vocab_size).tolist()
    ram = np.zeros(program.ram_words, dtype=np.int64)
    saturated = False
    for pos, tok in enumerate(ids):
        for ins in program.instrs:
            if ins.op == "halt":
                break
            clipped = _exec(ins, program.rom, ram, int(tok), pos)
            # the head's own clips are left to whoever reads the logits (a clipped one lies at the bound, which
            # they check): an earlier position's, never read, would refuse a run whose read logits are right
            saturated = saturated or (clipped and ins.dst != program.logits)
    return Emulation(ram[program.logits:program.logits + program.vocab_size].copy(), saturated)


def emulate(program: Program, ids: Sequence[int]) -> np.ndarray:
    """The last position's logits (Q16 integers) for current-vocabulary ids, as the hardware computes them."""
    return emulate_run(program, ids).logits


def at_bound(q16: np.ndarray) -> np.ndarray:
    """Which Q16 words lie at the 32-bit bound: saturated, or exactly there, which a reader cannot tell apart."""
    q16 = np.asarray(q16)
    return (q16 >= INT32_MAX) | (q16 <= INT32_MIN)


def to_float(q: np.ndarray) -> np.ndarray:
    return (np.asarray(q, dtype=np.float64) / ONE).astype(np.float32)
