"""Systematic corruptions of a valid .crystal file, for the Python reader and the C runtime alike.

Each case is (label, bytes, must_fail). Most cases re-seal the checksum after the
change, so that the structural checks behind it are what gets exercised; a few
leave it stale to show the checksum itself. Cases marked must_fail=False may be
valid files with other meaning (e.g. a different n_heads that still divides
d_model): for those, the readers must merely agree.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

from crystalc.format import crystal as fmt

Case = tuple[str, bytes, bool]

HEADER_FIELDS = {  # name: (offset, struct format)
    "magic": (0, "<I"), "version": (4, "<H"), "flags": (6, "<H"), "vocab_size": (8, "<I"),
    "orig_vocab_size": (12, "<I"), "d_model": (16, "<I"), "n_ctx": (20, "<I"), "n_heads": (24, "<I"),
    "n_blocks": (28, "<I"), "ffn_hidden": (32, "<I"), "n_sections": (36, "<I"), "table_offset": (40, "<Q"),
    "ln_eps": (48, "<d"), "field_eps": (56, "<d"),
}
ENTRY_FIELDS = {"dtype": (48, "<B"), "scheme": (49, "<B"), "ndim": (50, "<B"), "reserved": (51, "<B"),
                "group": (52, "<I"), "dim0": (56, "<I"), "dim1": (60, "<I"), "offset": (64, "<Q"),
                "length": (72, "<Q"), "qoffset": (80, "<Q"), "qlength": (88, "<Q")}
U64 = 2**64


def reseal(b: bytes | bytearray) -> bytes:
    b = bytes(b)
    return b[:-4] + struct.pack("<I", zlib.crc32(b[:-4]))


def patched(data: bytes, offset: int, form: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(form, b, offset, value)
    return reseal(b)


def table(data: bytes) -> tuple[int, list[fmt.Entry]]:
    n, off = struct.unpack_from("<IQ", data, 36)
    entries = []
    for i in range(n):
        raw = fmt.ENTRY.unpack_from(data, off + i * fmt.ENTRY.size)
        name = raw[0].rstrip(b"\0").decode()
        shape = (raw[6],) if raw[3] == 1 else (raw[6], raw[7])
        entries.append(fmt.Entry(name, raw[1], raw[2], shape, raw[5], raw[8], raw[9], raw[10], raw[11]))
    return off, entries


def header_cases(data: bytes) -> Iterator[Case]:
    d_model = struct.unpack_from("<I", data, 16)[0]
    is_pruned = struct.unpack_from("<H", data, 6)[0] & fmt.PRUNED_VOCAB
    for field, (off, form) in HEADER_FIELDS.items():
        (orig,) = struct.unpack_from(form, data, off)
        if form == "<d":
            # past float32's largest value: inf where the model computes (float32), an undefined conversion in C
            for v in (float("nan"), float("inf"), -1.0, 1e300, 3.4028236e38):
                yield f"header {field}={v}", patched(data, off, form, v), True
            for v in (0.0, 3.4028234e38):  # odd but valid
                yield f"header {field}={v}", patched(data, off, form, v), False
            continue
        bits = struct.calcsize(form) * 8
        values = {0, 1, orig - 1, orig + 1, (1 << bits) - 1, 1 << (bits - 1)}
        if bits >= 32:
            values |= {1 << 20, (1 << 20) + 1, 1 << 31, (1 << 32) - 1}
        if bits == 64:
            values |= {len(data), orig + 64, orig - 64, U64 - 64}
        if field == "flags":
            values |= {orig ^ (1 << k) for k in range(16)}
        for v in sorted(x % (1 << bits) for x in values):
            if v == orig:
                continue
            # a different head count that still divides d_model, or a field_norm toggle, is a valid file
            # a larger original vocabulary of a pruned model, too
            valid = ((field == "n_heads" and v and d_model % v == 0)
                     or (field == "flags" and v ^ orig == fmt.FIELD_NORM)
                     or (field == "orig_vocab_size" and is_pruned and orig < v <= 1 << 20))
            yield f"header {field}={v}", patched(data, off, form, v), not valid
    # the header's dimensions so large that their products overflow 32 and 64 bits
    for v, d in ((1 << 20, 1 << 20), (1 << 16, 1 << 16), ((1 << 32) - 1, (1 << 32) - 1)):
        b = bytearray(data)
        struct.pack_into("<II", b, 8, v, v)
        struct.pack_into("<I", b, 16, d)
        yield f"header vocab={v} d_model={d}", reseal(b), True
    # every other dimension 1: only the attention's D x D matrices pass 2^31 elements
    b = bytearray(data)
    struct.pack_into("<IIIIIII", b, 8, 1, 1, 46341, 1, 1, 1, 1)
    yield "header d_model=46341, the rest 1", reseal(b), True


def truncation_cases(data: bytes) -> Iterator[Case]:
    table_off, entries = table(data)
    cuts = {0, 3, 4, 7, 8, 63, 64, table_off, len(data) - 4, len(data) - 1}
    for e in entries:
        cuts |= {e.offset, e.offset + e.length, e.qoffset, e.qoffset + e.qlength}
    cuts |= {table_off + i * fmt.ENTRY.size for i in range(len(entries) + 1)}
    for k in sorted(c for c in cuts if 0 <= c < len(data)):
        yield f"truncated at {k}", data[:k], True
        if k >= 8:
            yield f"truncated at {k}, checksum re-sealed", reseal(data[:k] + b"\0\0\0\0")[:k], True
    yield "one trailing byte", data + b"\0", True
    yield "stale checksum", data[:100] + bytes([data[100] ^ 1]) + data[101:], True


def entry_cases(data: bytes, picks: int = 8) -> Iterator[Case]:
    table_off, entries = table(data)
    n = len(entries)
    chosen = sorted({0, 1, n - 1, n // 2} | {i for i, e in enumerate(entries) if e.scheme or e.length == 0
                                              or e.dtype >= fmt.DT_BOOL})
    chosen = chosen[: picks * 2]
    for i in chosen:
        e = entries[i]
        base = table_off + i * fmt.ENTRY.size
        f = {k: base + o for k, (o, _) in ENTRY_FIELDS.items()}
        tag = f"entry {e.name}"
        for v in (len(data), table_off, U64 - 64, (U64 - 64) // 2, len(data) + 64):
            # an empty section may sit exactly at the table's start
            yield f"{tag} offset={v} (past the end)", patched(data, f["offset"], "<Q", v), e.length or v != table_off
        for v in (e.length + 1, U64 - 1):
            yield f"{tag} length={v}", patched(data, f["length"], "<Q", v), True
        for k, v in (("dtype", 6), ("dtype", 255), ("scheme", 4), ("ndim", 0), ("ndim", 3), ("reserved", 1)):
            yield f"{tag} {k}={v}", patched(data, f[k], ENTRY_FIELDS[k][1], v), True
        if e.offset >= 128:
            yield f"{tag} offset misaligned", patched(data, f["offset"], "<Q", e.offset - 1), True
        if e.dtype == fmt.DT_F32 and e.length:  # weights past the numbers: refused, not computed with
            yield f"{tag} a NaN value", patched(data, e.offset + e.length - 4, "<f", float("nan")), True
            yield f"{tag} an Inf value", patched(data, e.offset, "<f", float("-inf")), True
        # shapes whose element count overflows 32 bits (2^16 x 2^16 = 2^32 -> 0) and 64 bits
        b = bytearray(data)
        struct.pack_into("<BII", b, f["ndim"], 2, 0, 0)
        struct.pack_into("<II", b, f["dim0"], 1 << 16, 1 << 16)
        struct.pack_into("<Q", b, f["length"], 0)
        yield f"{tag} dims 2^16 x 2^16 with length 0 (32-bit wrap)", reseal(b), True
        size = {fmt.DT_F32: 4, fmt.DT_I8: 1, fmt.DT_I16: 2, fmt.DT_BOOL: 1, fmt.DT_U8: 1, fmt.DT_I32: 4}[e.dtype]
        struct.pack_into("<II", b, f["dim0"], (1 << 32) - 1, (1 << 32) - 1)
        struct.pack_into("<Q", b, f["length"], ((1 << 32) - 1) ** 2 * size % U64)
        yield f"{tag} dims (2^32-1)^2 with the 64-bit wrapped length", reseal(b), True
        b = bytearray(data)
        struct.pack_into("<II", b, f["dim0"], (1 << 32) - 1, 0)
        yield f"{tag} dim0=2^32-1", reseal(b), True
        if e.scheme:
            yield f"{tag} qlength+8", patched(data, f["qlength"], "<Q", e.qlength + 8), True
            # the other scheme family's length: scale + offset (8 bytes a scale) where only scales
            # belong (row, group), or scales only (4 bytes) where offsets belong too (tensor)
            other = e.qlength // 2 if e.scheme == fmt.SCHEMES["tensor"] else 2 * e.qlength
            if other != e.qlength:
                yield f"{tag} qlength={other}", patched(data, f["qlength"], "<Q", other), True
            yield f"{tag} qoffset past the end", patched(data, f["qoffset"], "<Q", U64 - 64), True
            # a finite scale whose codes dequantize past float32: the first scale's group holds a code of
            # +-qmax (symmetric schemes) or the tensor's extreme (min/max), so 3e38 times it is Inf
            if e.qlength:
                yield f"{tag} first scale 3e38 (Inf values)", patched(data, e.qoffset, "<f", 3e38), True
            if e.length:
                yield f"{tag} parameters overlap its data", patched(data, f["qoffset"], "<Q", e.offset), True
            if e.scheme == fmt.SCHEMES["group"]:
                yield f"{tag} group=0", patched(data, f["group"], "<I", 0), True
                # a group wider than the row is the row (one scale a row): valid, and past an int in C
                wide = patched(data, f["group"], "<I", (1 << 32) - 1)
                yield f"{tag} group=2^32-1, a scale a row", patched(wide, f["qlength"], "<Q", 4 * e.shape[0]), False
        else:
            yield f"{tag} scheme=group without parameters", patched(data, f["scheme"], "<B", 3), True
        name = bytearray(data[base: base + 48])
        yield f"{tag} name without NUL", patched(data, base, "48s", b"x" * 48), True
        yield f"{tag} name with a trailing newline", patched(data, base, "48s", e.name.encode() + b"\n"), True
        name[0:1] = b"/"
        yield f"{tag} name with '/'", patched(data, base, "48s", bytes(name)), True
        other = entries[(i + 1) % n].name.encode()
        yield f"{tag} renamed to {other.decode()} (duplicate)", patched(data, base, "48s", other), True
        yield f"{tag} renamed to an unknown section", patched(data, base, "48s", b"blocks.99.field.x"), True
    # overlapping sections: point one section's data at another's
    nonempty = [i for i, e in enumerate(entries) if e.length]
    for a, b in zip(nonempty[:6], nonempty[1:7], strict=False):
        ea, eb = entries[a], entries[b]
        for off in {eb.offset, eb.offset + (eb.length // 2 // fmt.ALIGN) * fmt.ALIGN} - {ea.offset}:
            if off + ea.length > table_off:
                continue
            yield (f"section {ea.name} overlaps {eb.name}",
                   patched(data, table_off + a * fmt.ENTRY.size + 64, "<Q", off), True)
    # the boundary itself: a section of 64k + 1 bytes moved up by 64, so that its last byte is
    # the first of whatever follows, another section or the section table (its own padding is
    # all it crosses on the way)
    starts = [e.offset for e in entries if e.length] + [e.qoffset for e in entries if e.qlength] + [table_off]
    for i, e in enumerate(entries):
        nxt = min((s for s in starts if s > e.offset), default=None)
        if e.length > 1 and e.length % fmt.ALIGN == 1 and nxt == e.offset + e.length + 63:
            what = "the section table" if nxt == table_off else "the next section"
            yield (f"section {e.name} ends one byte into {what}",
                   patched(data, table_off + i * fmt.ENTRY.size + 64, "<Q", e.offset + fmt.ALIGN), True)


def tokenizer_cases(data: bytes) -> Iterator[Case]:
    """A char tokenizer with one character twice: which id would a prompt's character be? A byte-level BPE's
    tables with an id past the vocabulary, offsets that go back, merges out of order or ranked past their count
    (the runtime would read outside them, or its binary search would miss)."""
    _, entries = table(data)
    orig = struct.unpack_from("<I", data, 12)[0]
    for e in entries:
        if e.name == "tokenizer.chars" and e.length >= 2 and data[e.offset] < 0x80:
            yield "tokenizer.chars repeats its first character", patched(data, e.offset + 1, "<B", data[e.offset]), True
        if e.name == "tokenizer.bpe.byte_ids":
            yield "tokenizer.bpe.byte_ids holds the id past the vocabulary", patched(data, e.offset, "<i", orig), True
            yield "tokenizer.bpe.byte_ids holds a negative id", patched(data, e.offset + 4 * 255, "<i", -1), True
        if e.name == "tokenizer.bpe.offsets":
            yield "tokenizer.bpe.offsets go back", patched(data, e.offset + 4, "<i", 2**31 - 1), True
            end = patched(data, e.offset + e.length - 4, "<i", 2**31 - 1)
            yield "tokenizer.bpe.offsets end past the bytes", end, True
        if e.name == "tokenizer.bpe.merges" and e.shape[0] >= 2:
            first, second = data[e.offset:e.offset + 16], data[e.offset + 16:e.offset + 32]
            swapped = reseal(data[:e.offset] + second + first + data[e.offset + 32:])
            yield "tokenizer.bpe.merges out of order", swapped, True
            yield "tokenizer.bpe.merges rank past their count", patched(data, e.offset + 8, "<i", e.shape[0]), True
            yield "tokenizer.bpe.merges make an id past the vocabulary", patched(data, e.offset + 12, "<i", orig), True


def all_cases(data: bytes) -> list[Case]:
    return [*header_cases(data), *truncation_cases(data), *entry_cases(data), *tokenizer_cases(data)]
