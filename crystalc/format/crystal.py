"""The .crystal file: reader and writer. docs/crystal-format.md is the specification.

The layout is fixed-width and little-endian so that a C program can check it with
nothing but integer arithmetic: a 64-byte header, data sections each starting at a
multiple of 64 bytes, a table of 96-byte section entries, and a CRC-32 of
everything before it in the last four bytes. Every number read from a file is
checked before it is used as a size or an offset, so a malformed file ends as one
CrystalError naming the problem.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crystalc.config import FLOAT32_MAX, MAX_DIM, ModelConfig
from crystalc.errors import CrystalError
from crystalc.fsutil import atomic_file
from crystalc.ir.graph import Graph, build_graph, tensor_names
from crystalc.ir.tensor import Quant, Tensor
from crystalc.tokenizer import byte_level_bpe

MAGIC = 0x53595243  # b"CRYS" read as a little-endian u32
VERSION = 3  # the seeds' compiler wrote version 2 (read by crystalc.format.seeds_v2)
ALIGN = 64

# Flag bits. The first five keep the values the seeds' compiler gave them.
PRUNED_VOCAB = 0x0004
FLOAT32 = 0x0008
INT16 = 0x0010
MIXED = 0x0020
MIXED8 = 0x0040
CAUSAL = 0x0080
FIELD_NORM = 0x0100
FINAL_NORM = 0x0200
TIE_HEAD = 0x0400
KNOWN_FLAGS = PRUNED_VOCAB | FLOAT32 | INT16 | MIXED | MIXED8 | CAUSAL | FIELD_NORM | FINAL_NORM | TIE_HEAD
SUMMARY_FLAGS = FLOAT32 | INT16 | MIXED | MIXED8

HEADER = struct.Struct("<IHHIIIIIIIIQdd")
ENTRY = struct.Struct("<48sBBBBIIIQQQQ")
TRAILER = 4  # u32 CRC-32 of every byte before it
assert HEADER.size == 64 and ENTRY.size == 96

# dtype codes: the first three are crystal.h's enum crystal_dtype.
DT_F32, DT_I8, DT_I16, DT_BOOL, DT_U8, DT_I32 = range(6)
DTYPE_NUMPY = {DT_F32: "<f4", DT_I8: "i1", DT_I16: "<i2", DT_BOOL: "u1", DT_U8: "u1", DT_I32: "<i4"}
DTYPE_NAME = {DT_F32: "f32", DT_I8: "i8", DT_I16: "i16", DT_BOOL: "bool", DT_U8: "u8", DT_I32: "i32"}
IR_DTYPE_CODE = {"f32": DT_F32, "i8": DT_I8, "i16": DT_I16, "bool": DT_BOOL}
# scheme codes: crystal.h's enum crystal_scheme.
SCHEMES = {"tensor": 1, "row": 2, "group": 3}
SCHEME_NAME = {v: k for k, v in SCHEMES.items()}

NAME_BYTES = 48
_NAME_RE = re.compile(r"[A-Za-z0-9_.]+")
EXTRA_SECTIONS = {"vocab_map": DT_I32, "tokenizer.chars": DT_U8, "tokenizer.json": DT_U8, "meta.json": DT_U8,
                  "tokenizer.bpe.bytes": DT_U8, "tokenizer.bpe.offsets": DT_I32, "tokenizer.bpe.byte_ids": DT_I32}
# A byte-level BPE's tables for the C runtime (crystalc.tokenizer.byte_level_bpe), derived from tokenizer.json:
# each original id's bytes (bytes, offsets [V+1]), each byte's id [256], merges [M, 4] (left, right, rank, merged
# id; sorted by pair). The one 2-D extra section is the merges'.
BPE_SECTIONS = ("tokenizer.bpe.bytes", "tokenizer.bpe.offsets", "tokenizer.bpe.byte_ids", "tokenizer.bpe.merges")
EMBEDDINGS = ("token_embed.weight", "pos_embed.weight")


def summary_flags(dtypes: dict[str, str]) -> int:
    """The seeds' mode bits, from the dtype of every weight tensor (frozen masks excluded)."""
    emb = {dtypes[n] for n in EMBEDDINGS}
    rest = {d for n, d in dtypes.items() if n not in EMBEDDINGS and d != "bool"}
    every = emb | rest
    if every == {"f32"}:
        return FLOAT32
    if every == {"i16"}:
        return INT16
    if emb == {"f32"} and rest == {"i16"}:
        return MIXED
    if emb == {"f32"} and rest == {"i8"}:
        return MIXED8
    return 0


def param_bytes(scheme: int, shape: tuple[int, ...], group: int) -> int:
    """Bytes of a section's quantization parameters: scales and offsets under `tensor`; only
    scales under the symmetric `row` and `group`, whose offsets are zero by definition."""
    per_scale = 8 if scheme == SCHEMES["tensor"] else 4
    return per_scale * n_scales(scheme, shape, group)


def n_scales(scheme: int, shape: tuple[int, ...], group: int) -> int:
    rows = shape[0] if len(shape) == 2 else 1
    if scheme == SCHEMES["tensor"]:
        return 1
    if scheme == SCHEMES["row"]:
        return rows
    return rows * -(-shape[-1] // group)


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


# --- writing -----------------------------------------------------------------------------

@dataclass
class _Section:
    name: str
    dtype: int
    shape: tuple[int, ...]
    data: bytes
    scheme: int = 0
    group: int = 0
    qdata: bytes = b""


def _bpe_sections(tok: Any, n_orig: int) -> list[_Section]:
    """The byte-level BPE tables of a Hugging Face tokenizer, when it is one the C programs can run."""
    if not isinstance(tok, dict) or tok.get("kind") != "hf-tokenizers" or not isinstance(tok.get("json"), str):
        return []
    try:
        bpe = byte_level_bpe(tok["json"])
    except CrystalError:  # another shape: the runtime takes --prompt-ids (crystalc run encodes text for it)
        return []
    if len(bpe.token_bytes) != n_orig:
        return []
    text = b"".join(bpe.token_bytes)
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in bpe.token_bytes])]).astype("<i4")
    merges = bpe.merge_table()
    return [_Section("tokenizer.bpe.bytes", DT_U8, (len(text),), text),
            _Section("tokenizer.bpe.offsets", DT_I32, offsets.shape, offsets.tobytes()),
            _Section("tokenizer.bpe.byte_ids", DT_I32, (256,), np.asarray(bpe.byte_ids, dtype="<i4").tobytes()),
            _Section("tokenizer.bpe.merges", DT_I32, merges.shape, merges.tobytes())]


def _sections(graph: Graph) -> list[_Section]:
    c = graph.config
    out = []
    for t in graph.tensors():  # canonical names in file order (Graph.verify)
        name = t.name
        code = IR_DTYPE_CODE[t.dtype]
        data = np.ascontiguousarray(t.data, dtype=DTYPE_NUMPY[code]).tobytes()
        sec = _Section(name, code, t.shape, data)
        if t.quant is not None:
            q = t.quant
            sec.scheme, sec.group = SCHEMES[q.scheme], (q.group if q.scheme == "group" else 0)
            sec.qdata = np.ascontiguousarray(q.scale, dtype="<f4").tobytes()
            if q.scheme == "tensor":  # the symmetric schemes' offsets are 0 (Graph.verify): none stored
                sec.qdata += np.ascontiguousarray(q.offset, dtype="<f4").tobytes()
        out.append(sec)
    if graph.vocab_map is not None:
        if graph.orig_vocab_size is None or graph.orig_vocab_size >= 2**31:
            raise CrystalError("cannot write .crystal: the original vocabulary size must be below 2^31")
        out.append(_Section("vocab_map", DT_I32, (c.vocab_size,), graph.vocab_map.astype("<i4").tobytes()))
    tok = graph.tokenizer
    if tok is not None:
        if set(tok) == {"kind", "chars"} and tok["kind"] == "char" and isinstance(tok["chars"], str):
            raw = tok["chars"].encode("utf-8")
            out.append(_Section("tokenizer.chars", DT_U8, (len(raw),), raw))
        else:
            raw = _json_bytes(tok, "tokenizer")
            out.append(_Section("tokenizer.json", DT_U8, (len(raw),), raw))
            out += _bpe_sections(tok, graph.original_vocab_size)
    if graph.meta:
        raw = _json_bytes(graph.meta, "meta")
        out.append(_Section("meta.json", DT_U8, (len(raw),), raw))
    return out


def _plain(o: Any) -> Any:
    """o as JSON can hold it: numpy and torch scalars and arrays (common in training metrics) as numbers and
    lists, every NaN or infinity as None (JSON has no such numbers: a training run without a validation set
    records NaN losses, and a strict reader refuses Python's NaN), a set as its sorted list, keys and anything
    else (bytes) as their repr, an int past the readers' digits as its size: the spec leaves a checkpoint's meta
    free-form, and a record of it is better than a model that cannot be written."""
    import sys

    torch = sys.modules.get("torch")  # a torch tensor can only be here if torch is loaded: not imported for it
    if isinstance(o, bool) or o is None or isinstance(o, str):
        return o
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, int):
        # (300 bits are 91 digits, within JSON_NUMBER; str() of a huge int would raise)
        return o if o.bit_length() <= 300 else f"<an int of {o.bit_length()} bits>"
    if isinstance(o, dict):
        out: dict[str, Any] = {}
        for k, v in o.items():
            key = k if isinstance(k, str) else repr(_plain(k))
            if key in out:  # {1: .., "1": ..}: one would be lost
                raise CrystalError(f"cannot write .crystal: two keys of the meta are both {key!r} as JSON")
            out[key] = _plain(v)
        return out
    if isinstance(o, (list, tuple)):
        return [_plain(v) for v in o]
    if isinstance(o, (set, frozenset)):  # sorted: a set's order changes with PYTHONHASHSEED, the file must not
        return sorted((_plain(v) for v in o), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(o, np.generic | np.ndarray) or (torch is not None and isinstance(o, torch.Tensor)):
        return _plain(o.tolist())
    return repr(o)


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        raw = json.dumps(_plain(obj), sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                         allow_nan=False).encode("utf-8")
        _json_loads(raw)  # what the readers would refuse is not written
    except (TypeError, ValueError, RecursionError) as e:
        raise CrystalError(f"cannot write .crystal: the {what} is not JSON-serialisable ({e})") from None
    return raw


def encode_crystal(graph: Graph) -> bytes:
    """The bytes of the .crystal file for `graph` (deterministic: same graph, same bytes)."""
    graph.verify()
    c = graph.config
    sections = _sections(graph)
    body = bytearray(b"\0" * HEADER.size)
    entries = []
    for s in sections:
        off = _align(len(body))
        body += b"\0" * (off - len(body)) + s.data
        qoff = 0
        if s.scheme:  # even an empty parameter block (a 0-row tensor) gets a valid aligned offset
            qoff = _align(len(body))
            body += b"\0" * (qoff - len(body)) + s.qdata
        if len(s.name) >= NAME_BYTES:
            raise CrystalError(f"cannot write .crystal: section name {s.name} is {NAME_BYTES} bytes or longer")
        dims = list(s.shape) + [0] * (2 - len(s.shape))
        entries.append(ENTRY.pack(s.name.encode("ascii"), s.dtype, s.scheme, len(s.shape), 0, s.group,
                                  dims[0], dims[1], off, len(s.data), qoff, len(s.qdata)))
    table_offset = _align(len(body))
    body += b"\0" * (table_offset - len(body))
    for e in entries:
        body += e
    flags = CAUSAL | summary_flags({t.name: t.dtype for t in graph.tensors()})
    flags |= (PRUNED_VOCAB if graph.vocab_map is not None else 0) | (FIELD_NORM if c.field_norm else 0)
    flags |= (FINAL_NORM if c.final_norm else 0) | (TIE_HEAD if c.tie_head else 0)
    orig = graph.orig_vocab_size if graph.vocab_map is not None else c.vocab_size
    body[: HEADER.size] = HEADER.pack(MAGIC, VERSION, flags, c.vocab_size, orig, c.d_model, c.n_ctx, c.n_heads,
                                      c.n_blocks, c.ffn_hidden, len(entries), table_offset,
                                      float(c.ln_eps), float(c.field_eps))
    body += struct.pack("<I", zlib.crc32(body))
    return bytes(body)


def write_crystal(graph: Graph, path: str | Path) -> int:
    """Write `graph` to `path` atomically; returns the file size in bytes."""
    data = encode_crystal(graph)
    with atomic_file(path) as f:
        f.write(data)
    return len(data)


# --- reading -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    dtype: int
    scheme: int
    shape: tuple[int, ...]
    group: int
    offset: int
    length: int
    qoffset: int
    qlength: int


def read_crystal(path: str | Path) -> Graph:
    """A verified Graph from a .crystal file of version 3 (crystalc's) or 2 (the seeds')."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CrystalError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return decode_crystal(data)
    except CrystalError as e:
        raise CrystalError(f"{path}: {e}") from None


def decode_crystal(data: bytes) -> Graph:
    if len(data) < 8:
        raise CrystalError(f"file is {len(data)} bytes, too short for a .crystal header")
    magic, version = struct.unpack_from("<IH", data, 0)
    if magic != MAGIC:
        raise CrystalError("not a .crystal file (bad magic)")
    if version == 2:
        from crystalc.format.seeds_v2 import decode_seeds_v2

        return decode_seeds_v2(data)
    if version != VERSION:
        raise CrystalError(f"unsupported .crystal version {version} (this crystalc reads 2 and {VERSION})")
    if len(data) < HEADER.size + TRAILER:
        raise CrystalError(f"file is {len(data)} bytes, too short for a .crystal header and checksum")
    (_, _, flags, vocab, orig_vocab, d, t, h, n_blocks, ffn, n_sections, table_offset,
     ln_eps, field_eps) = HEADER.unpack_from(data, 0)
    for what, v in (("vocab_size", vocab), ("d_model", d), ("n_ctx", t), ("n_heads", h),
                    ("n_blocks", n_blocks), ("ffn_hidden", ffn), ("orig_vocab_size", orig_vocab)):
        if not 1 <= v <= MAX_DIM:
            raise CrystalError(f"header: {what} = {v} is outside 1..{MAX_DIM}")
    if d % h:
        raise CrystalError(f"header: d_model {d} is not divisible by n_heads {h}")
    if orig_vocab < vocab:
        raise CrystalError(f"header: orig_vocab_size {orig_vocab} is smaller than vocab_size {vocab}")
    for what, v in (("ln_eps", ln_eps), ("field_eps", field_eps)):
        if not 0 <= v <= FLOAT32_MAX:  # NaN fails too
            raise CrystalError(f"header: {what} = {v} is not a non-negative number within float32's range")
    if flags & ~KNOWN_FLAGS:
        raise CrystalError(f"header: unknown flag bits 0x{flags & ~KNOWN_FLAGS:04x}")
    if not flags & CAUSAL:
        raise CrystalError("header: the CAUSAL flag is missing (every crystalc model has causal attention)")
    if not flags & PRUNED_VOCAB and orig_vocab != vocab:
        raise CrystalError(f"header: orig_vocab_size {orig_vocab} differs from vocab_size {vocab} "
                           "in a file without PRUNED_VOCAB")
    if table_offset % ALIGN or table_offset < HEADER.size:
        raise CrystalError(f"header: section table offset {table_offset} is not a multiple of {ALIGN} "
                           f"at or after byte {HEADER.size}")
    end = table_offset + n_sections * ENTRY.size + TRAILER
    if end > len(data):
        raise CrystalError(f"file is truncated: {len(data)} bytes, the section table and checksum end at {end}")
    if end < len(data):
        raise CrystalError(f"{len(data) - end} unexpected bytes after the checksum")
    stored = struct.unpack_from("<I", data, len(data) - TRAILER)[0]
    actual = zlib.crc32(memoryview(data)[: len(data) - TRAILER])
    if stored != actual:
        raise CrystalError(f"checksum mismatch (stored 0x{stored:08x}, contents give 0x{actual:08x}): "
                           "the file is corrupted")
    entries = _read_table(data, table_offset, n_sections)

    # The config: numbers from the header, neuron counts from the field sections' shapes.
    n_neurons = []
    for b in range(n_blocks):
        e = entries.get(f"blocks.{b}.field.positions")
        if e is None:
            raise CrystalError(f"missing section blocks.{b}.field.positions")
        n_neurons.append(e.shape[0])
    try:
        config = ModelConfig(vocab_size=vocab, d_model=d, n_ctx=t, n_heads=h, n_blocks=n_blocks,
                             n_neurons=tuple(n_neurons), ffn_hidden=ffn, field_norm=bool(flags & FIELD_NORM),
                             field_eps=field_eps, final_norm=bool(flags & FINAL_NORM),
                             tie_head=bool(flags & TIE_HEAD), ln_eps=ln_eps)
    except (TypeError, ValueError) as err:
        raise CrystalError(f"header: {err}") from None
    config.validate()
    names = tensor_names(config)
    for n in names:
        if n not in entries:
            raise CrystalError(f"missing section {n}")
    for n, e in entries.items():
        if n in EXTRA_SECTIONS:
            if e.dtype != EXTRA_SECTIONS[n] or len(e.shape) != 1:
                raise CrystalError(f"section {n}: expected a 1-D {DTYPE_NAME[EXTRA_SECTIONS[n]]} array")
        elif n == "tokenizer.bpe.merges":
            if e.dtype != DT_I32 or len(e.shape) != 2 or e.shape[1] != 4:
                raise CrystalError(f"section {n}: expected an i32 array of 4 columns")
        elif n not in names:
            raise CrystalError(f"unknown section {n}")

    params = {n: _tensor(data, entries[n]) for n in names}
    if summary_flags({n: p.dtype for n, p in params.items()}) != flags & SUMMARY_FLAGS:
        raise CrystalError(f"header: mode flags 0x{flags & SUMMARY_FLAGS:04x} disagree with the sections' dtypes")

    vocab_map = None
    if (flags & PRUNED_VOCAB) != ("vocab_map" in entries) * PRUNED_VOCAB:
        raise CrystalError("the PRUNED_VOCAB flag and the presence of a vocab_map section disagree")
    if "vocab_map" in entries:
        e = entries["vocab_map"]
        if e.shape != (vocab,):
            raise CrystalError(f"vocab_map: shape {list(e.shape)}, expected [{vocab}]")
        vocab_map = _array(data, e).astype(np.int64)
    tokenizer = None
    if "tokenizer.chars" in entries and "tokenizer.json" in entries:
        raise CrystalError("both tokenizer.chars and tokenizer.json sections are present")
    if "tokenizer.chars" in entries:
        try:
            chars = bytes(_array(data, entries["tokenizer.chars"])).decode("utf-8")
        except UnicodeDecodeError:
            raise CrystalError("tokenizer.chars: not valid UTF-8") from None
        tokenizer = {"kind": "char", "chars": chars}
    elif "tokenizer.json" in entries:
        tokenizer = _json_section(data, entries["tokenizer.json"])
        if isinstance(tokenizer, dict) and tokenizer.get("kind") == "char":  # the C runtime reads chars only there
            raise CrystalError("tokenizer.json: a char tokenizer belongs in a tokenizer.chars section")
    given = [n for n in BPE_SECTIONS if n in entries]
    if given:  # derived data: it must be what this tokenizer gives, or the runtime would encode otherwise
        want = {sec.name: sec for sec in _bpe_sections(tokenizer, orig_vocab)}
        for n in BPE_SECTIONS:
            sec, e = want.get(n), entries.get(n)
            if sec is None or e is None or e.shape != sec.shape or _array(data, e).tobytes() != sec.data:
                raise CrystalError(f"section {n}: not the byte-level BPE tables of the file's tokenizer.json")
    meta = _json_section(data, entries["meta.json"]) if "meta.json" in entries else {}
    return build_graph(config, params, tokenizer, vocab_map=vocab_map,
                       orig_vocab_size=orig_vocab if vocab_map is not None else None, meta=meta)


def _read_table(data: bytes, table_offset: int, n_sections: int) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    ranges: list[tuple[int, int, str]] = []
    for i in range(n_sections):
        (raw_name, dtype, scheme, ndim, reserved, group, d0, d1, off, length, qoff,
         qlen) = ENTRY.unpack_from(data, table_offset + i * ENTRY.size)
        name = _entry_name(raw_name, i)
        if name in entries:
            raise CrystalError(f"section {name} appears twice")
        where = f"section {name}"
        if dtype not in DTYPE_NUMPY:
            raise CrystalError(f"{where}: unknown dtype code {dtype}")
        if ndim not in (1, 2) or (ndim == 1 and d1 != 0) or reserved:
            raise CrystalError(f"{where}: bad shape header (ndim {ndim}, dims {d0}, {d1})")
        shape = (d0,) if ndim == 1 else (d0, d1)
        itemsize = np.dtype(DTYPE_NUMPY[dtype]).itemsize
        if int(np.prod(shape, dtype=object)) * itemsize != length:
            raise CrystalError(f"{where}: {length} bytes do not hold a {DTYPE_NAME[dtype]} tensor of shape "
                               f"{list(shape)}")
        _check_range(where, off, length, table_offset)
        if scheme == 0:
            if group or qoff or qlen:
                raise CrystalError(f"{where}: quantization parameters without a quantization scheme")
        else:
            if dtype not in (DT_I8, DT_I16) or scheme not in SCHEME_NAME:
                raise CrystalError(f"{where}: quantization scheme code {scheme} on a {DTYPE_NAME[dtype]} tensor")
            if (scheme == SCHEMES["group"]) != (group > 0) or (scheme == SCHEMES["group"] and ndim != 2):
                raise CrystalError(f"{where}: group size {group} does not fit the scheme {SCHEME_NAME[scheme]}")
            want = param_bytes(scheme, shape, group)
            if qlen != want:
                raise CrystalError(f"{where}: {qlen} bytes of quantization parameters, expected {want}")
            _check_range(f"{where} (quantization parameters)", qoff, qlen, table_offset)
            ranges.append((qoff, qoff + qlen, name))
        if dtype in (DT_I8, DT_I16) and scheme == 0:
            raise CrystalError(f"{where}: an integer tensor needs a quantization scheme")
        ranges.append((off, off + length, name))
        entries[name] = Entry(name, dtype, scheme, shape, group, off, length, qoff, qlen)
    ranges = sorted(r for r in ranges if r[1] > r[0])
    for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:], strict=False):
        if start_b < end_a:
            raise CrystalError(f"sections {a} and {b} overlap")
    return entries


def _entry_name(raw: bytes, i: int) -> str:
    nul = raw.find(b"\0")
    if nul <= 0 or raw[nul:].strip(b"\0"):
        raise CrystalError(f"section table entry {i}: name is empty or not NUL-terminated")
    try:
        name = raw[:nul].decode("ascii")
    except UnicodeDecodeError:
        name = ""
    if not _NAME_RE.fullmatch(name):
        raise CrystalError(f"section table entry {i}: bad name {raw[:nul]!r}")
    return name


def _check_range(where: str, off: int, length: int, limit: int) -> None:
    if off % ALIGN or off < HEADER.size or off + length > limit:
        raise CrystalError(f"{where}: bytes {off}..{off + length} are not {ALIGN}-aligned data between the "
                           f"header and the section table (byte {limit})")


def _array(data: bytes, e: Entry) -> np.ndarray:
    a = np.frombuffer(data, dtype=DTYPE_NUMPY[e.dtype], count=e.length // np.dtype(DTYPE_NUMPY[e.dtype]).itemsize,
                      offset=e.offset)
    return a.reshape(e.shape)


def _tensor(data: bytes, e: Entry) -> Tensor:
    a = _array(data, e)
    if e.dtype == DT_BOOL:
        if a.size and a.max() > 1:
            raise CrystalError(f"section {e.name}: a bool tensor holds values other than 0 and 1")
        return Tensor(e.name, a.astype(np.bool_))
    if e.dtype not in (DT_F32, DT_I8, DT_I16):
        raise CrystalError(f"section {e.name}: dtype {DTYPE_NAME[e.dtype]} is not a weight dtype")
    arr = np.array(a, dtype={DT_F32: np.float32, DT_I8: np.int8, DT_I16: np.int16}[e.dtype])
    if e.scheme == 0:
        return Tensor(e.name, arr)
    n = n_scales(e.scheme, e.shape, e.group)
    symmetric = e.scheme != SCHEMES["tensor"]
    q = np.frombuffer(data, dtype="<f4", count=n if symmetric else 2 * n, offset=e.qoffset).astype(np.float32)
    qshape: tuple[int, ...] = (1,) if e.scheme == SCHEMES["tensor"] else (n,)
    if e.scheme == SCHEMES["group"]:
        qshape = (e.shape[0], n // e.shape[0]) if e.shape[0] else (0, -(-e.shape[1] // e.group))
    scale = q[:n].reshape(qshape).copy()
    offset = np.zeros_like(scale) if symmetric else q[n:].reshape(qshape).copy()
    quant = Quant(SCHEME_NAME[e.scheme], scale, offset, e.group if e.scheme == SCHEMES["group"] else 0)
    return Tensor(e.name, arr, quant)


# Bounds on the JSON sections that the C runtime's syntax check shares (JSON_DEPTH, JSON_NUMBER), so
# that the two readers refuse the same files; crystalc's writer refuses to write past them.
JSON_DEPTH = 64
JSON_NUMBER = 100
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _json_number(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if len(text) > JSON_NUMBER:
            raise ValueError("number too long")
        value = convert(text)
        if value in (math.inf, -math.inf):
            raise ValueError(f"{text} overflows a double")
        return value
    return parse


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's extensions NaN, Infinity, -Infinity


def _nesting(text: str) -> int:
    """How deep arrays and objects nest in valid JSON `text`, counted in the text: in the parsed value a
    repeated key would hide its earlier, deeper value."""
    steps = [1 if c in "[{" else -1 for c in _JSON_BRACKET.findall(_JSON_STRING.sub("", text))]
    return max(itertools.accumulate(steps), default=0)


def _strings(obj: Any) -> Iterator[str]:
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            yield x
        elif isinstance(x, dict):
            stack += [*x, *x.values()]
        elif isinstance(x, list):
            stack += x


def _json_loads(raw: bytes) -> Any:
    """A JSON section's value, within the bounds both readers hold to (else ValueError)."""
    text = raw.decode("utf-8")
    obj = json.loads(text, parse_int=_json_number(int), parse_float=_json_number(float), parse_constant=_not_json)
    if _nesting(text) > JSON_DEPTH:
        raise ValueError(f"arrays and objects nested more than {JSON_DEPTH} deep")
    for s in _strings(obj):
        s.encode("utf-8")  # a \ud800 escape alone is half a character (UnicodeEncodeError, a ValueError)
    return obj


def _json_section(data: bytes, e: Entry) -> dict[str, Any]:
    try:
        obj = _json_loads(bytes(_array(data, e)))
    except (ValueError, RecursionError) as err:  # (UnicodeDecodeError is a ValueError)
        raise CrystalError(f"section {e.name}: not valid UTF-8 JSON ({err})") from None
    if not isinstance(obj, dict):
        raise CrystalError(f"section {e.name}: expected a JSON object")
    return obj
