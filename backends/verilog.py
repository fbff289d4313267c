"""The Verilog backend: a graph becomes a fixed-point core, simulated by Icarus and synthesised by Yosys.

Decisions taken here and in backends/fixedpoint.py (the templates in
templates/verilog/ only render text):

- The hardware is one small sequential core (crystal_core.v, the same for every
  model) that runs the model's *program*: one instruction per IR op and linear
  layer, named after the op, one multiply-accumulate a clock. The model is data:
  two ROMs of Q16.16 weights (rom.hex, a word at a time; lanes.hex, the words
  the lanes read together: `core_memories`) and program.hex. One core
  for every shape keeps the Verilog readable and small; a model changes only the
  memories and model.vh's sizes.
- Arithmetic is Q16.16 with exact 64-bit products and sums; `fixedpoint.emulate`
  is the same arithmetic in numpy, and the simulation must equal it word for
  word. A quantized tensor's words are made of its codes (fixedpoint.Codes), and
  the lane ROM holds the codes themselves, 4 int8 or 2 int16 a 32-bit lane word,
  with their multipliers in a lane scale ROM: the core makes each word as it
  reads it, a quarter or half of the block RAMs for the same numbers.
- The testbench runs a prompt through the core one position at a time (the
  key/value caches live in RAM) and prints the last position's logits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from crystalc.backends import fixedpoint
from crystalc.backends.fixedpoint import EXP_TABLE, GELU_TABLE, INT32_MAX, INT32_MIN, Codes, Instr, Program, lower
from crystalc.backends.tools import run_tool
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph, current_rows
from crystalc.ir.interpret import check_ids
from crystalc.ir.tensor import read_only
from crystalc.templating import copy_template, render
from crystalc.tokenizer import Tokenizer

STATIC_FILES = ("crystal_core.v", "crystal_gen.v", "crystal_tb.v")
MAX_LANES = 64
# The encoding's constants (fixedpoint's FIELDS, OPCODES and flags, TO_KEYS and TO_VALUES among them) are
# read through the module when used (fixedpoint.TO_KEYS, not a copy imported by name): model.vh's defines
# (`encoding`) and the program words are then made of the same values
SIM = "sim.vvp"
TOKENIZER = "tokenizer.json"  # the model's tokenizer record (crystalc.tokenizer), when it has one


class Simulator(NamedTuple):
    target: str  # what `make` builds, relative to the output folder
    command: list[str]  # runs it, in the output folder
    build_tools: tuple[str, ...]
    run_tools: tuple[str, ...]


SIMULATORS = {
    "icarus": Simulator(SIM, ["vvp", "-n", SIM], ("make", "iverilog"), ("vvp",)),
    "verilator": Simulator("obj_dir/crystal_sim", ["obj_dir/crystal_sim"], ("make", "verilator"), ()),
    # the design as Yosys synthesises it, written back as Verilog (netlist.v) and compiled by Verilator
    "netlist": Simulator("obj_netlist/crystal_sim", ["obj_netlist/crystal_sim"], ("make", "yosys", "verilator"), ()),
}


@dataclass(frozen=True)
class CoreMemories:
    """A program's memories as the core holds them: the ROM in two, the key and value caches out of the RAM.

    `rom` holds the words read one at a time (embeddings, norms, biases, the field's coefficients);
    `lane_rom` [words, lanes] the words the lanes read together, one wide word a clock: a linear
    layer's weights and the field's positions, LANES rows side by side, and the field's values,
    LANES components side by side, short groups padded with zeros. One wide memory instead of a
    read port a lane: an FPGA keeps it in block RAMs as wide as the lanes, with no copies. The caches
    are laid out for the lanes the same way (below), and the RAM keeps activations, scores and logits."""

    instrs: tuple[Instr, ...]  # the program, its fields pointing into these memories
    rom: np.ndarray  # (the arrays are read-only)
    rom_table: tuple[tuple[str, int, int], ...]  # (what, base, words), for the listings
    lane_rom: np.ndarray
    lane_table: tuple[tuple[str, int, int], ...]
    lane_scales: np.ndarray  # [words, lanes]: the multipliers of the codes in lane_rom, Q0.32 (Codes)
    scale_table: tuple[tuple[str, int, int], ...]
    ram_words: int  # the RAM without the key/value caches, which have memories of their own
    ram_table: tuple[tuple[str, int, int], ...]
    logits: int
    key_words: int  # keys: word kb + d * key_groups + p // lanes holds component d of positions side by side
    key_groups: int
    value_words: int  # values: word vb + (g * heads + h) * T + p holds components g * lanes.. of head h
    cache_table: tuple[tuple[str, int, int], ...]  # a block's keys, then its values, for each attention in order
    n_ctx: int  # T

    def verify(self) -> None:
        """What crystal_core.v relies on and cannot check itself (a word out of range is read as x or written
        nowhere, silently): the program ends in halt and every instruction encodes; each memory's table tiles
        it in order (the caches' entries alternate keys and values, each tiling its own memory); every word
        fits its 32 bits; each tensor an instruction reads starts an entry of the memory it is read from, of
        the size the instruction reads; every RAM span an instruction reads or writes (the logits among them)
        lies in the RAM; the attention reads and k_proj and v_proj write caches of the layout above."""
        def fail(why: str) -> CrystalError:
            return CrystalError(f"core memories: {why}")

        if not self.instrs or self.instrs[-1].op != "halt":
            raise fail("the program does not end in halt")
        for ins in self.instrs:
            ins.word()  # a known opcode, every field within 32 bits
        if self.lane_rom.ndim != 2 or self.lane_scales.ndim != 2 or self.lane_rom.shape[1] != self.lane_scales.shape[1]:
            raise fail(f"the lane ROM {list(self.lane_rom.shape)} and its scales {list(self.lane_scales.shape)} "
                       "are not [words, lanes] of the same lanes")
        lanes = self.lane_rom.shape[1]
        if not 1 <= lanes <= MAX_LANES or self.key_groups != -(-self.n_ctx // lanes):
            raise fail(f"{lanes} lanes and {self.key_groups} key groups for {self.n_ctx} positions")

        def entries(what: str, table: Sequence[tuple[str, int, int]], size: int) -> dict[int, int]:
            return fixedpoint.tiling("core memories", what, table, size)

        rom = entries("ROM", self.rom_table, self.rom.size)
        lane = entries("lane ROM", self.lane_table, len(self.lane_rom))
        scale = entries("lane scale ROM", self.scale_table, len(self.lane_scales))
        entries("RAM", self.ram_table, self.ram_words)
        keys = entries("key cache", self.cache_table[0::2], self.key_words)
        values = entries("value cache", self.cache_table[1::2], self.value_words)
        for what, words, lo, hi in (("ROM", self.rom, INT32_MIN, INT32_MAX), ("lane ROM", self.lane_rom, INT32_MIN,
                                    (1 << 32) - 1), ("lane scale ROM", self.lane_scales, 0, (1 << 32) - 1)):
            if words.size and (words.min() < lo or words.max() > hi):
                raise fail(f"a {what} word does not fit 32 bits")
        if not 0 <= self.logits < self.ram_words:
            raise fail(f"the logits at {self.logits} are outside the RAM of {self.ram_words} words")

        def starts(ins: Instr, what: str, table: dict[int, int], base: int, words: int | None = None) -> None:
            if base not in table or words is not None and table[base] != words:
                raise fail(f"{ins.note}: {what} at {base} starts no entry" + (f" of {words} words" if words else ""))

        def in_ram(ins: Instr, field: str, words: int) -> None:
            base = getattr(ins, field)
            if base < 0 or base + words > self.ram_words:
                raise fail(f"{ins.note}: {field} = {base} + {words} words is outside the RAM of {self.ram_words}")

        cache_flags = fixedpoint.TO_KEYS | fixedpoint.TO_VALUES
        heads: dict[int, tuple[int, int]] = {}  # a value cache's base: (heads, width) as the attention reads it
        for ins in self.instrs:
            if ins.op == "causal_attention":
                starts(ins, "keys", keys, ins.a, ins.n * self.key_groups)
                starts(ins, "values", values, ins.b, -(-ins.c // lanes) * ins.m * self.n_ctx)
                heads[ins.b] = (ins.m, ins.c)
                if ins.c * ins.m != ins.n:
                    raise fail(f"{ins.note}: {ins.m} heads of width {ins.c} for D = {ins.n}")
        for ins in self.instrs:
            if ins.op == "token_embedding":
                starts(ins, "the token embedding", rom, ins.a)
                starts(ins, "the position embedding", rom, ins.b, self.n_ctx * ins.n)
            if ins.op == "layer_norm":
                starts(ins, "the weight", rom, ins.a, ins.n)
                starts(ins, "the bias", rom, ins.b, ins.n)
            if ins.op == "linear":
                starts(ins, "the bias", rom, ins.b, ins.n)
            if ins.op == "neuron_field":
                starts(ins, "the coefficients", rom, ins.c, ins.m)
            if ins.op in ("linear", "neuron_field"):
                for slot in ("a", "b") if ins.op == "neuron_field" else ("a",):
                    starts(ins, slot, lane, getattr(ins, slot))
                    if getattr(ins, "q" + slot):
                        starts(ins, f"{slot}'s multipliers", scale, getattr(ins, "s" + slot))
            if ins.op == "linear":
                in_ram(ins, "src", ins.m)
                to = ins.flags & cache_flags
                if to == fixedpoint.TO_KEYS:
                    starts(ins, "the key cache", keys, ins.dst, ins.n * self.key_groups)
                elif to == fixedpoint.TO_VALUES:
                    if heads.get(ins.dst) != (ins.k, ins.c) or ins.flags & fixedpoint.PER_POSITION:
                        raise fail(f"{ins.note}: writes value cache {ins.dst} as {ins.k} heads of width {ins.c}, "
                                   f"read as {heads.get(ins.dst)}")
                elif to:
                    raise fail(f"{ins.note}: writes both caches")
                else:
                    in_ram(ins, "dst", ins.n * (self.n_ctx if ins.flags & fixedpoint.PER_POSITION else 1))
            elif ins.op in ("token_embedding", "layer_norm", "gelu", "causal_attention", "neuron_field"):
                in_ram(ins, "dst", ins.n)
                if ins.op != "token_embedding":
                    in_ram(ins, "src", ins.n)
                if ins.op in ("causal_attention", "neuron_field"):
                    in_ram(ins, "s", self.n_ctx if ins.op == "causal_attention" else ins.m)


def _side_by_side(matrix: np.ndarray, lanes: int) -> np.ndarray:
    """[rows, cols] -> [ceil(rows / lanes) * cols, lanes]: word (group, col) holds rows group * lanes + g."""
    rows, cols = matrix.shape
    groups = -(-rows // lanes)
    padded = np.zeros((groups * lanes, cols), dtype=np.int64)
    padded[:rows] = matrix
    return padded.reshape(groups, lanes, cols).transpose(0, 2, 1).reshape(groups * cols, lanes)


def _packed(codes: np.ndarray, lanes: int, bits: int) -> np.ndarray:
    """[rows, cols] codes -> words as _side_by_side's, 32 // bits columns a word: column j of a lane's row in
    bits bits * (j % per) .. of its group's word j // per, each group starting a word."""
    rows, cols = codes.shape
    per = 32 // bits
    groups, span = -(-rows // lanes), -(-cols // per)
    padded = np.zeros((groups * lanes, span * per), dtype=np.int64)
    padded[:rows, :cols] = codes & ((1 << bits) - 1)
    slots = padded.reshape(groups, lanes, span, per) << (bits * np.arange(per))
    return slots.sum(axis=3).transpose(0, 2, 1).reshape(groups * span, lanes)


def _scale_walk(coded: Codes, cols: int, transposed: bool) -> tuple[int, int]:
    """How the core's scale pointer walks a coded tensor's multipliers: (words a pass, steps a word). A pass
    of 0 words reads the same words in every pass: the tensor scheme's one multiplier, or the field values'
    one a neuron (a step, by component)."""
    if coded.scheme == "tensor":
        return 0, cols
    if coded.scheme == "row":
        return (0, 1) if transposed else (1, cols)
    return (cols, 1) if transposed else (-(-cols // coded.group), coded.group)


def _scale_words(mult: np.ndarray, lanes: int, per_pass: int, steps: int) -> np.ndarray:
    """The multipliers of a [rows, cols] tensor walked as _scale_walk says: [words, lanes], lane g of word
    p per_pass + t holding row p lanes + g's multiplier of steps t steps .. (t + 1) steps - 1."""
    rows, cols = mult.shape
    groups = -(-rows // lanes)
    padded = np.zeros((groups * lanes, cols), dtype=np.int64)
    padded[:rows] = mult
    words = padded[:, ::steps].reshape(groups, lanes, -1).transpose(0, 2, 1)  # [groups, words a pass, lanes]
    return words[0] if per_pass == 0 else words.reshape(-1, lanes)


class _Placement(NamedTuple):
    """Where a tensor the lanes read lies in the lane ROM, and how the core makes words of it."""

    base: int
    pack: int = 0  # 0: words; 1, 2: int16, int8 codes (2^pack a lane word)
    scales: int = 0  # its multipliers' first word in the lane scale ROM
    per_pass: int = 0  # words the scale pointer moves a pass (0: every pass reads the same ones)
    steps: int = 0  # steps the scale pointer stays on a word
    offset: int = 0  # Q16, added to every word

    def fields(self, slot: str) -> dict[str, int]:
        """The instruction's fields for the tensor in slot a or b (fixedpoint.FIELDS)."""
        return {slot: self.base, "q" + slot: self.pack, "s" + slot: self.scales, "p" + slot: self.per_pass,
                "g" + slot: self.steps, "o" + slot: self.offset}


class _LaneROM:
    """The lane ROM and its scale ROM as core_memories fills them, [words, lanes] each, with their listings."""

    def __init__(self, lanes: int) -> None:
        self.lanes = lanes
        self.parts: list[np.ndarray] = []
        self.table: list[tuple[str, int, int]] = []
        self.scale_parts: list[np.ndarray] = []
        self.scale_table: list[tuple[str, int, int]] = []

    @staticmethod
    def _append(parts: list[np.ndarray], table: list[tuple[str, int, int]], what: str, words: np.ndarray) -> int:
        base = sum(len(part) for part in parts)
        parts.append(words)
        table.append((what, base, len(words)))
        return base

    def place(self, what: str, words: np.ndarray, coded: Codes | None, transposed: bool) -> _Placement:
        """A tensor the lanes read as [rows, cols] words (transposed: the stored tensor is [cols, rows]): its
        codes and their multipliers when they take fewer words than its words, else its words."""
        rows, cols = words.shape
        how = ["by component"] if transposed else []
        if coded is not None:
            codes, mult = (coded.codes.T, coded.mult.T) if transposed else (coded.codes, coded.mult)
            per_pass, steps = _scale_walk(coded, cols, transposed)
            packed, scales = _packed(codes, self.lanes, coded.bits), _scale_words(mult, self.lanes, per_pass, steps)
            if len(packed) + len(scales) < -(-rows // self.lanes) * cols:
                how.append(f"int{coded.bits} codes, {32 // coded.bits} a lane word")
                base = self._append(self.parts, self.table, f"{what} ({'; '.join(how)})", packed)
                first = self._append(self.scale_parts, self.scale_table, f"{what}: multipliers ({coded.scheme})",
                                     scales)
                return _Placement(base, 1 if coded.bits == 16 else 2, first, per_pass, steps, coded.offset)
        label = what + (f" ({how[0]})" if how else "")
        return _Placement(self._append(self.parts, self.table, label, _side_by_side(words, self.lanes)))

    def words(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros((0, self.lanes), dtype=np.int64)

    def scale_words(self) -> np.ndarray:
        return np.concatenate(self.scale_parts) if self.scale_parts else np.zeros((0, self.lanes), dtype=np.int64)


def core_memories(program: Program, lanes: int) -> CoreMemories:
    """Lay the program's memories out for a core of `lanes` lanes (CoreMemories) and point its instructions
    at them: ROM fields into the two ROMs, RAM fields into the smaller RAM, k_proj and v_proj into the caches
    (TO_KEYS, TO_VALUES, with the heads' count and width for the values), the attention's into the caches.
    A quantized tensor the lanes read goes into the lane ROM as its codes when they and their multipliers
    take fewer words than its words would (the q, s, p, g, o fields of its instruction say how)."""
    flat = program.rom
    names = {base: what for what, base, _ in program.rom_table}
    single = set()  # flat bases of the tensors read a word at a time
    for ins in program.instrs:
        if ins.op in ("token_embedding", "layer_norm"):
            single |= {ins.a, ins.b}
        elif ins.op == "linear":
            single.add(ins.b)
        elif ins.op == "neuron_field":
            single.add(ins.c)
    rom_parts, rom_table, moved = [], [], {}
    size = 0
    for what, base, n in program.rom_table:
        if base in single:
            moved[base] = size
            rom_parts.append(flat[base:base + n])
            rom_table.append((what, size, n))
            size += n
    lane_rom = _LaneROM(lanes)

    def add_lanes(base_flat: int, rows: int, cols: int, transposed: bool = False) -> _Placement:
        """The tensor at flat ROM base_flat, [rows, cols] (transposed: stored [cols, rows]), into the lane ROM."""
        words = flat[base_flat:base_flat + rows * cols].reshape((cols, rows) if transposed else (rows, cols))
        return lane_rom.place(names[base_flat], words.T if transposed else words, program.codes.get(base_flat),
                              transposed)

    # the RAM: the key and value caches leave it for memories of their own, laid out for the lanes
    t = program.n_ctx
    key_groups = -(-t // lanes)
    attention = [ins for ins in program.instrs if ins.op == "causal_attention"]
    caches: dict[int, tuple[int, int]] = {}  # RAM base of a cache -> (TO_KEYS | TO_VALUES, its base there)
    cache_table: list[tuple[str, int, int]] = []
    key_words = value_words = 0
    for att in attention:
        width = att.n  # D
        groups = -(-att.c // lanes)  # of a head's components
        caches[att.a] = (fixedpoint.TO_KEYS, key_words)
        cache_table.append((f"keys of {att.note.split(':')[0]}", key_words, width * key_groups))
        key_words += width * key_groups
        caches[att.b] = (fixedpoint.TO_VALUES, value_words)
        cache_table.append((f"values of {att.note.split(':')[0]}", value_words, groups * att.m * t))
        value_words += groups * att.m * t
    ram_moved: dict[int, int] = {}
    ram_table: list[tuple[str, int, int]] = []
    ram_words = 0
    for what, base, n in program.ram_table:
        if base not in caches:
            ram_moved[base] = ram_words
            ram_table.append((what, ram_words, n))
            ram_words += n
    heads = {att.b: (att.m, att.c) for att in attention}  # a value cache's heads: count, width

    instrs: list[Instr] = []
    for flat_ins in program.instrs:
        ins = flat_ins
        if ins.op != "halt":
            ins = dataclasses.replace(ins, src=ram_moved.get(ins.src, 0), s=ram_moved.get(ins.s, 0),
                                      dst=ram_moved.get(ins.dst, 0))
        if ins.op in ("token_embedding", "layer_norm"):
            ins = dataclasses.replace(ins, a=moved[ins.a], b=moved[ins.b])
        elif ins.op == "linear":
            ins = dataclasses.replace(ins, b=moved[ins.b], **add_lanes(ins.a, ins.n, ins.m).fields("a"))
            if flat_ins.dst in caches:  # k_proj, v_proj: the current position's row into its cache
                flag, base = caches[flat_ins.dst]
                count, width = heads.get(flat_ins.dst, (0, 0))
                flags = (ins.flags & ~fixedpoint.PER_POSITION) | flag
                ins = dataclasses.replace(ins, dst=base, flags=flags, c=width, k=count)
        elif ins.op == "causal_attention":
            ins = dataclasses.replace(ins, a=caches[flat_ins.a][1], b=caches[flat_ins.b][1])
        elif ins.op == "neuron_field":
            # positions [neurons, D] a row a neuron; values [neurons, D] by component, a row a component
            ins = dataclasses.replace(ins, c=moved[ins.c], **add_lanes(ins.a, ins.m, ins.n).fields("a"),
                                      **add_lanes(ins.b, ins.n, ins.m, transposed=True).fields("b"))
        instrs.append(ins)
    rom = np.concatenate(rom_parts) if rom_parts else np.zeros(0, dtype=np.int64)
    mem = CoreMemories(tuple(instrs), read_only(rom), tuple(rom_table), read_only(lane_rom.words()),
                       tuple(lane_rom.table), read_only(lane_rom.scale_words()), tuple(lane_rom.scale_table), ram_words,
                       tuple(ram_table), ram_moved[program.logits], key_words, key_groups, value_words,
                       tuple(cache_table), t)
    mem.verify()
    return mem


def _hex_words(words: np.ndarray) -> list[str]:
    return [f"{int(w) & 0xFFFFFFFF:08x}" for w in words]


def rom_hex(mem: CoreMemories) -> str:
    lines = []
    for what, base, n in mem.rom_table:
        lines.append(f"// {base}: {what} ({n} words)")
        lines.extend(_hex_words(mem.rom[base:base + n]))
    return "\n".join(lines) + "\n"


def _wide_hex(words: np.ndarray, table: Sequence[tuple[str, int, int]]) -> str:
    """One wide word a line, lane 0 in the lowest 32 bits (the rightmost digits)."""
    lines = []
    for what, base, n in table:
        lines.append(f"// {base}: {what} ({n} words)")
        lines.extend("".join(reversed(_hex_words(row))) for row in words[base:base + n])
    return "\n".join(lines) + "\n"


def lanes_hex(mem: CoreMemories) -> str:
    return _wide_hex(mem.lane_rom, mem.lane_table)


def scales_hex(mem: CoreMemories) -> str:
    """The lane scale ROM; one word of zeros when no tensor is coded (a memory needs a word)."""
    if not len(mem.lane_scales):
        return "// no tensor is held as codes\n" + "0" * 8 * mem.lane_rom.shape[1] + "\n"
    return _wide_hex(mem.lane_scales, mem.scale_table)


def table_hex(what: str, words: np.ndarray) -> str:
    return f"// {what}\n" + "\n".join(_hex_words(words)) + "\n"


def program_hex(instrs: Sequence[Instr]) -> str:
    lines = []
    for pc, ins in enumerate(instrs):
        fields = " ".join(f"{f}={getattr(ins, f) if f != 'op' else ins.op}" for f in fixedpoint.FIELDS)
        lines.append(f"// {pc}: {ins.note}  [{fields}]")
        lines.append(f"{ins.word():0{8 * len(fixedpoint.FIELDS)}x}")
    return "\n".join(lines) + "\n"


def _flag_bit(name: str, value: int) -> int:
    """A flag's bit index in the flags field: Python holds flags as the bits' values (flags & HAS_EPS), the
    core tests bits by index (flags[HAS_EPS])."""
    if value <= 0 or value & (value - 1) or value.bit_length() > 32:
        raise CrystalError(f"internal: flag {name} = {value} is not a single bit of the 32-bit flags field")
    return value.bit_length() - 1


class Encoding(NamedTuple):
    """model.vh's defines of the program's encoding: (name, value), in the order they are written."""

    fields: list[tuple[str, int]]  # FIELD_X: field x's lowest bit in a program word
    opcodes: list[tuple[str, int]]  # OP_X, by value
    flags: list[tuple[str, list[tuple[str, int]]]]  # (op, its FLAG_X: the flag's bit index in the flags field)


def encoding() -> Encoding:
    """How program.hex encodes an instruction, for crystal_core.v: each field's place (fixedpoint.FIELDS), each
    opcode (fixedpoint.OPCODES) and each flag's bit (fixedpoint's linear and neuron_field flags, TO_KEYS and
    TO_VALUES among them). The core holds no number of its own for them, so a change to these constants reaches
    the Verilog with the program it runs."""
    fields = [(f"FIELD_{name.upper()}", 32 * i) for i, name in enumerate(fixedpoint.FIELDS)]
    opcodes = sorted(fixedpoint.OPCODES.items(), key=lambda item: item[1])
    if len({code for _, code in opcodes}) != len(opcodes) or not all(0 <= code < 1 << 32 for _, code in opcodes):
        raise CrystalError(f"internal: the opcodes {dict(opcodes)} are not distinct 32-bit words")
    flags = []
    for op, named in (("linear", {"ACCUMULATE": fixedpoint.ACCUMULATE, "PER_POSITION": fixedpoint.PER_POSITION,
                                  "TO_KEYS": fixedpoint.TO_KEYS, "TO_VALUES": fixedpoint.TO_VALUES}),
                      ("neuron_field", {"NORMALIZE": fixedpoint.NORMALIZE, "HAS_EPS": fixedpoint.HAS_EPS})):
        bits = {name: _flag_bit(name, value) for name, value in named.items()}
        if len(set(bits.values())) != len(bits):
            raise CrystalError(f"internal: {op}'s flags {named} share a bit")
        flags.append((op, [(f"FLAG_{name}", bit) for name, bit in bits.items()]))
    return Encoding(fields, [(f"OP_{op.upper()}", code) for op, code in opcodes], flags)


class VerilogBackend:
    name = "verilog"

    def emit(self, graph: Graph, out_dir: Path, *, lanes: int = 1) -> list[Path]:
        """Write crystal_core.v, crystal_tb.v, model.vh, rom.hex, lanes.hex, scales.hex, program.hex, the
        function tables (exp2.hex, gelu.hex) and a Makefile into out_dir.

        lanes: sums the core computes at once, one multiplier each (linear rows, the field's neurons and
        output components)."""
        if not 1 <= lanes <= MAX_LANES:
            raise CrystalError(f"--lanes {lanes} is outside 1..{MAX_LANES}")
        out_dir = Path(out_dir)
        enc = encoding()  # first: an encoding the core cannot decode is refused as that
        program = lower(graph)
        mem = core_memories(program, lanes)
        # TOKEN_CYCLES bounds every position, so it is the costliest one's: a position's cycles are not monotone (a
        # lanes' pass over the positions drains beside the next group's steps once they reach LANES), and the last
        # can take fewer than the one before (D 32, one head, window 8, 8 lanes). Listed: the first, the last and it
        by_pos = [core_cycles(program, lanes, pos) for pos in range(program.n_ctx)]
        costliest = max(range(program.n_ctx), key=lambda pos: sum(by_pos[pos].values()))
        cycles = [(pos, sum(by_pos[pos].values()), by_pos[pos]) for pos in sorted({0, program.n_ctx - 1, costliest})]
        ctx = {
            "summary": program.summary, "instrs": mem.instrs, "rom_table": mem.rom_table,
            "lane_table": mem.lane_table, "ram_table": mem.ram_table, "rom_words": int(mem.rom.size),
            "lane_words": len(mem.lane_rom), "scale_table": mem.scale_table,
            "scale_words": max(1, len(mem.lane_scales)), "program_words": len(mem.instrs),
            "instr_bits": 32 * len(fixedpoint.FIELDS), **enc._asdict(),
            "ram_words": mem.ram_words, "logits": mem.logits, "cache_table": mem.cache_table,
            "key_words": mem.key_words, "key_groups": mem.key_groups, "value_words": mem.value_words,
            "vocab_size": program.vocab_size, "n_ctx": program.n_ctx, "lanes": lanes,
            "cycles": cycles,
            "token_cycles": sum(by_pos[costliest].values()) + 4,  # and crystal_gen's 4
        }
        written = []
        for template, name in (("model.vh.j2", "model.vh"), ("Makefile.j2", "Makefile")):
            path = out_dir / name
            path.write_text(render("verilog", template, **ctx), encoding="utf-8")
            written.append(path)
        for name, text in (("rom.hex", rom_hex(mem)), ("lanes.hex", lanes_hex(mem)), ("scales.hex", scales_hex(mem)),
                           ("program.hex", program_hex(mem.instrs)),
                           ("exp2.hex", table_hex("2^(i/256), Q29, i = 0..256", EXP_TABLE)),
                           ("gelu.hex", table_hex("GELU(-8 + i/64), Q16.16, i = 0..1024", GELU_TABLE))):
            (out_dir / name).write_text(text, encoding="ascii")
            written.append(out_dir / name)
        if program.vocab_map is not None:
            # row -> original id, for whoever reads the logits (the testbench prints rows)
            (out_dir / "vocab_map.txt").write_text("".join(f"{int(i)}\n" for i in program.vocab_map))
            written.append(out_dir / "vocab_map.txt")
        if graph.tokenizer is not None:  # for `crystalc simulate --prompt`, which speaks text
            (out_dir / TOKENIZER).write_text(json.dumps(graph.tokenizer, sort_keys=True) + "\n", encoding="utf-8")
            written.append(out_dir / TOKENIZER)
        written += [copy_template("verilog", name, out_dir) for name in STATIC_FILES]
        return written

    def build(self, out_dir: Path, *, simulator: str = "icarus") -> Path:
        """Build the simulation: Icarus Verilog's sim.vvp (`make sim.vvp`), Verilator's obj_dir/crystal_sim, or
        Verilator's obj_netlist/crystal_sim of the Verilog Yosys writes back after reading the design. One that
        is up to date is left as it is, without asking for the tools that build it (a folder built elsewhere
        runs where only vvp is: make's question needs make alone)."""
        sim = _simulator(simulator)
        target = Path(out_dir) / sim.target
        if target.is_file() and shutil.which("make") is not None:
            asked = subprocess.run(["make", "-q", "-s", "-C", str(out_dir), sim.target], capture_output=True)
            if asked.returncode == 0:
                return target
        run_tool(["make", "-s", "-C", str(out_dir), sim.target], sim.build_tools,
                 f"building the {simulator} simulation")
        return target


_SIZES = ("ROM_WORDS", "LANE_WORDS", "SCALE_WORDS", "PROGRAM_WORDS", "INSTR_BITS", "VOCAB_SIZE", "N_CTX", "LANES",
          "TOKEN_CYCLES")


def cycle_bound(sizes: dict[str, int], prompt_len: int, generate: int) -> int:
    """At least the clock cycles crystal_tb counts for a run (cycles_counted's terms, every position priced as
    the costliest, TOKEN_CYCLES, every token as refilling the whole window), from model.vh alone: a simulation
    past twice this is a damaged program looping, stopped by the testbench's +max_cycles."""
    t, v, tc = sizes["N_CTX"], sizes["VOCAB_SIZE"], sizes["TOKEN_CYCLES"]
    return prompt_len + 2 + prompt_len * tc + generate * (v + 2 + t + t * tc)


def _defines(out_dir: Path) -> dict[str, int]:
    """model.vh's sizes; a folder's files are read back, so a damaged one is one line naming the file."""
    path = Path(out_dir) / "model.vh"
    if not path.is_file():
        raise CrystalError(f"{out_dir} is not a folder compiled with --target verilog (it has no model.vh)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CrystalError(f"{path}: cannot read it: {e}") from None
    sizes = {name: int(value) for name, value in re.findall(r"^`define (\w+) (\d+)$", text, re.MULTILINE)}
    missing = [name for name in _SIZES if name not in sizes]
    if missing:
        raise CrystalError(f"{path} defines no {missing[0]}: not written by crystalc compile --target verilog")
    return sizes


def _check_memories(out_dir: Path, sizes: dict[str, int]) -> None:
    """Every memory file holds the words model.vh says, as hex of the memory's width: $readmemh leaves the
    words a short file lacks undefined, and the simulation would run on them without a word."""
    lanes = 8 * sizes["LANES"]
    for name, words, digits in (("rom.hex", sizes["ROM_WORDS"], 8), ("lanes.hex", sizes["LANE_WORDS"], lanes),
                                ("scales.hex", sizes["SCALE_WORDS"], lanes),
                                ("program.hex", sizes["PROGRAM_WORDS"], sizes["INSTR_BITS"] // 4),
                                ("exp2.hex", 257, 8), ("gelu.hex", 1025, 8)):
        path = out_dir / name
        try:
            lines = [ln for ln in path.read_text(encoding="ascii").splitlines() if ln and not ln.startswith("//")]
        except (OSError, UnicodeDecodeError) as e:
            raise CrystalError(f"{path}: cannot read it: {e}") from None
        word = re.compile(f"[0-9a-f]{{{digits}}}")
        if len(lines) != words or not all(word.fullmatch(ln) for ln in lines):
            raise CrystalError(f"{path} is damaged: model.vh says {words} words of {digits} hex digits "
                               f"(compile the folder again)")


def _simulator(name: str) -> Simulator:
    if name not in SIMULATORS:
        raise CrystalError(f"unknown simulator {name!r}; known: {', '.join(SIMULATORS)}")
    return SIMULATORS[name]


class Simulation(NamedTuple):
    values: np.ndarray  # the last position's Q16 logits, or the rows of the greedy tokens
    cycles: int
    saturated: bool  # crystal_gen's flag: a value of the run reached Q16.16's bound (fixedpoint.emulate_run's)


def saturation_error(generate: int) -> CrystalError:
    made = "tokens" if generate else "logits"
    return CrystalError(f"a value reached Q16.16's bound (+-32768) in the simulation, where the hardware saturates: "
                        f"this model's values are beyond what the core represents, and the {made} are not the model's")


def simulate(out_dir: Path, ids: list[int], simulator: str = "icarus", timeout: float | None = None,
             generate: int = 0, shift: int = 1) -> tuple[np.ndarray, int]:
    """Run the built simulation on current-vocabulary ids: (the last position's Q16 logits, clock cycles), or
    with generate=G, (the rows of G greedy tokens, the window shifted by `shift` when full, clock cycles).
    Refused when a value saturated: in range or not, the outputs are then not the model's."""
    run = run_simulation(out_dir, ids, simulator, timeout, generate, shift)
    # the core leaves the logits' own clips to their reader: here the last position's (generation's argmax
    # reads them in crystal_gen, which flags one at the bound)
    if run.saturated or (not generate and fixedpoint.at_bound(run.values).any()):
        raise saturation_error(generate)
    return run.values, run.cycles


def run_simulation(out_dir: Path, ids: list[int], simulator: str = "icarus", timeout: float | None = None,
                   generate: int = 0, shift: int = 1) -> Simulation:
    """`simulate`'s run, its saturation flag returned instead of refused (to hold it to the emulator's)."""
    out_dir = Path(out_dir)
    sim = _simulator(simulator)
    if not (out_dir / sim.target).is_file():
        raise CrystalError(f"{out_dir / sim.target} does not exist: build first (crystalc compile --build, or make)")
    sizes = _defines(out_dir)
    _check_memories(out_dir, sizes)
    ids = check_ids(ids, sizes["N_CTX"], sizes["VOCAB_SIZE"]).tolist()
    if generate < 0:
        raise CrystalError(f"cannot generate {generate} tokens")
    if not 1 <= shift <= sizes["N_CTX"]:
        raise CrystalError(f"--shift {shift} is outside 1..{sizes['N_CTX']}")
    with tempfile.TemporaryDirectory() as tmp:
        prompt = Path(tmp) / "ids.hex"
        prompt.write_text("".join(f"{i:08x}\n" for i in ids))
        limit = 2 * cycle_bound(sizes, len(ids), generate) + 1000
        args = [f"+prompt={prompt}", f"+tokens={len(ids)}", f"+max_cycles={limit}"] + (
            [f"+generate={generate}", f"+shift={shift}"] if generate else [])
        out = run_tool([*sim.command, *args], sim.run_tools, f"simulating the Verilog with {simulator}",
                       cwd=out_dir, timeout=timeout)
    logits: dict[int, int] = {}
    tokens: list[int] = []
    cycles = -1
    saturated: bool | None = None
    if re.search(r"^timeout ", out, re.MULTILINE):
        raise CrystalError(f"the simulation ran past {limit} clock cycles, more than this model's program can take: "
                           f"{out_dir / 'program.hex'} is damaged (compile the folder again)")
    if re.search(r"^(logit \d+|token|saturated|cycles) .*[xz]", out, re.MULTILINE | re.IGNORECASE):
        raise CrystalError(f"the simulation computed undefined values (x) from the files in {out_dir}: "
                           "compile the folder again")
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "logit":
            logits[int(parts[1])] = int(parts[2])
        elif len(parts) == 2 and parts[0] == "token":
            tokens.append(int(parts[1]))
        elif len(parts) == 2 and parts[0] == "cycles":
            cycles = int(parts[1])
        elif len(parts) == 2 and parts[0] == "saturated":
            saturated = parts[1] != "0"
    if generate:
        if len(tokens) != generate or cycles < 0:
            said = " ".join(out.split())[:500]
            raise CrystalError(f"the simulation printed {len(tokens)} of {generate} tokens: {said}")
        values = np.array(tokens, dtype=np.int64)
    elif not logits or cycles < 0 or sorted(logits) != list(range(sizes["VOCAB_SIZE"])):
        raise CrystalError(f"the simulation printed {len(logits)} of {sizes['VOCAB_SIZE']} logits: "
                           f"{' '.join(out.split())[:500]}")
    else:
        values = np.array([logits[i] for i in range(len(logits))], dtype=np.int64)
    if saturated is None:  # a testbench from before the flag: its outputs could be saturated unsaid
        raise CrystalError(f"the simulation printed no saturation flag: {out_dir / 'crystal_tb.v'} is older than "
                           "this crystalc (compile the folder again)")
    return Simulation(values, cycles, saturated)


def compiled_tokenizer(out_dir: Path) -> Tokenizer:
    """The tokenizer a compiled folder's model came with (tokenizer.json)."""
    path = Path(out_dir) / TOKENIZER
    if not path.is_file():
        raise CrystalError(f"{out_dir} has no {TOKENIZER} (its model had no tokenizer): give --prompt-ids")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CrystalError(f"{path}: not a tokenizer ({e})") from None
    if not isinstance(spec, dict):
        raise CrystalError(f"{path}: not a tokenizer (expected a JSON object)")
    tokenizer = Tokenizer(spec)
    rows = _row_map(Path(out_dir))
    need = max(rows.to_orig, default=-1) + 1  # a pruned model's tokenizer may hold ids past its rows
    if tokenizer.vocab_size < need or (not rows.pruned and tokenizer.vocab_size != need):
        model = f"uses ids up to {need - 1}" if rows.pruned else f"has {need}"
        raise CrystalError(f"{path}: a tokenizer of {tokenizer.vocab_size} tokens, but the hardware's model {model}")
    return tokenizer


class _Rows(NamedTuple):
    """A compiled folder's current-vocabulary rows and the original ids they stand for."""

    to_orig: list[int]
    pruned: bool
    window: int  # N_CTX: a prompt keeps its last `window` tokens

    def of(self, original_ids: list[int]) -> list[int]:
        return current_rows(original_ids, self.to_orig, None if self.pruned else len(self.to_orig))


def check_prompt(out_dir: Path, original_ids: list[int], tokenizer: Tokenizer | None = None) -> None:
    """Every id of a prompt has a row in the compiled folder, checked before anything is built; a token a
    pruning removed is named as text when the prompt was text (`tokenizer`), as `crystalc run` names it."""
    rows = _row_map(Path(out_dir))
    try:
        rows.of(original_ids)
    except CrystalError:
        if tokenizer is None:
            raise
        kept = set(rows.to_orig)
        lost = next(i for i in original_ids if i not in kept)
        raise CrystalError(f"--prompt: token {tokenizer.decode([lost])!r} (id {lost}) was pruned from this "
                           "model's vocabulary") from None


def compiled_window(out_dir: Path) -> int:
    """The context length N_CTX of a folder compiled with --target verilog."""
    return _defines(Path(out_dir))["N_CTX"]


def _rows(out_dir: Path, simulator: str) -> _Rows:
    """The folder's rows (vocab_map.txt when pruned), its simulation (re)built first when it is missing or
    older than its sources (make decides: a no-op otherwise)."""
    rows = _row_map(out_dir)
    BACKEND.build(out_dir, simulator=simulator)
    return rows


def _row_map(out_dir: Path) -> _Rows:
    """The folder's rows: vocab_map.txt when pruned, else 0..VOCAB_SIZE-1."""
    sizes = _defines(out_dir)
    window, vocab = sizes["N_CTX"], sizes["VOCAB_SIZE"]
    map_file = out_dir / "vocab_map.txt"
    try:
        rows_to_orig = ([int(v) for v in map_file.read_text(encoding="ascii").split()] if map_file.is_file()
                        else list(range(vocab)))
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise CrystalError(f"{map_file}: not a list of token ids: {e}") from None
    if len(rows_to_orig) != vocab:
        raise CrystalError(f"{map_file} lists {len(rows_to_orig)} ids for a vocabulary of {vocab}")
    return _Rows(rows_to_orig, map_file.is_file(), window)


def simulate_logits(out_dir: Path, original_ids: list[int],
                    simulator: str = "icarus") -> tuple[list[tuple[int, float]], int]:
    """(original id, logit) of every row for a prompt of original-tokenizer ids (its last N_CTX), as the
    programs' --logits prints them, and the clock cycles the testbench counted; builds the simulation first
    when it is not there."""
    out_dir = Path(out_dir)
    rows = _rows(out_dir, simulator)
    q16, cycles, saturated = run_simulation(out_dir, rows.of(original_ids)[-rows.window:], simulator)
    held = np.flatnonzero(fixedpoint.at_bound(q16))
    if len(held):  # a RAM word saturates: printed, it would pass for the model's logit
        raise CrystalError(f"the logit of id {rows.to_orig[int(held[0])]} reached Q16.16's bound (+-32768), where "
                           "the hardware saturates: this model's logits are beyond what the core represents")
    if saturated:  # inside the network: the logits look in range, but are not the model's
        raise saturation_error(0)
    return [(orig, float(v) / (1 << 16)) for orig, v in zip(rows.to_orig, q16, strict=True)], cycles


def simulate_generate(out_dir: Path, original_ids: list[int], n: int, shift: int = 1,
                      simulator: str = "icarus") -> tuple[list[int], int]:
    """n greedy tokens (original ids) after a prompt of original ids (its last N_CTX), generated by the simulated
    hardware (crystal_gen), and the clock cycles the testbench counted."""
    out_dir = Path(out_dir)
    rows = _rows(out_dir, simulator)
    if n == 0:
        return [], 0
    made, cycles = simulate(out_dir, rows.of(original_ids)[-rows.window:], simulator, generate=n, shift=shift)
    return [rows.to_orig[int(r)] for r in made], cycles


def _lanes_pass(rows: int, steps: int, lanes: int) -> int:
    """Clock cycles of a lanes' pass over `rows` sums of `steps` terms: a group of rows a step a clock, and
    each group's drain (a row a clock) beside the next group's steps when they are as many as the lanes
    (a drain takes at most that), after them when fewer; the last group's drain after all."""
    groups = -(-rows // lanes)
    drained = rows - (groups - 1) * lanes if steps >= lanes else rows
    return groups * steps + drained


def core_cycles(program: Program, lanes: int, pos: int) -> dict[str, int]:
    """Clock cycles crystal_core takes for one token at position `pos`, by op (the core's state machine
    counted: a fetch and a next state an instruction, one step a clock, lanes' passes as _lanes_pass)."""
    cycles: dict[str, int] = {}
    positions = pos + 1
    for ins in program.instrs:
        if ins.op == "halt":
            steps = -1  # fetched, then idle
        elif ins.op in ("token_embedding", "gelu"):
            steps = ins.n
        elif ins.op == "layer_norm":
            steps = 3 * ins.n  # sum, variance, output
        elif ins.op == "linear":
            steps = _lanes_pass(ins.n, ins.m, lanes)  # rows: outputs, steps: columns
        elif ins.op == "causal_attention":  # m heads of width c: scores, exps, outputs
            steps = ins.m * (_lanes_pass(positions, ins.c, lanes) + positions + _lanes_pass(ins.c, positions, lanes))
        elif ins.op == "neuron_field":
            neurons, width = ins.m, ins.n
            steps = (_lanes_pass(neurons, width, lanes)  # distances, each neuron's root in the drain
                     + neurons + (1 if ins.flags & fixedpoint.HAS_EPS else 0)  # exps, the eps term
                     + _lanes_pass(width, neurons, lanes))  # outputs, each component's division in the drain
        else:
            raise CrystalError(f"no cycle count for op {ins.op!r}")
        cycles[ins.op] = cycles.get(ins.op, 0) + steps + 2
    return cycles


def cycles_counted(program: Program, lanes: int, prompt_len: int, generate: int = 0, shift: int = 1) -> int:
    """The clock cycles crystal_tb counts for a prompt of prompt_len tokens (and `generate` greedy tokens after
    it, the window shifted by `shift` when full): a clock a token to load the buffer and two to start; for each
    position crystal_gen runs, the core's cycles (core_cycles) and four of its own (read the token, start the
    core, which sees it a clock later, see it done); for each token made, its vocabulary's logits read and
    compared a clock each, one more to read the first and one to give the token out; for each shift, a clock
    a token kept or added."""
    t = program.n_ctx

    def run(pos: int) -> int:
        return sum(core_cycles(program, lanes, pos).values()) + 4

    total = prompt_len + 2 + sum(run(p) for p in range(prompt_len))
    length = prompt_len
    for made in range(1, generate + 1):
        total += program.vocab_size + 2
        if made == generate:
            break
        if length == t:  # the window is full: drop the oldest `shift`, run the rest and the new token again
            length = t - shift + 1
            total += length + sum(run(p) for p in range(length))
        else:
            total += run(length)
            length += 1
    return total


def synthesize(out_dir: Path, timeout: float | None = None, top: str = "crystal_core") -> str:
    """Synthesise the core (or crystal_gen, the generator around it) with its memories with Yosys (`make synth`);
    returns Yosys's statistics."""
    run_tool(["make", "-s", "-C", str(out_dir), "synth", f"TOP={top}"], ("make", "yosys"),
             "synthesising the Verilog with Yosys", timeout=timeout)
    return (Path(out_dir) / "synth.txt").read_text()


BACKEND = VerilogBackend()
