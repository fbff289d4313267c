"""Malformed .crystal files: the Python reader and the C loader (under ASan + UBSan) reject them with one line.

The corruptions (tests/format/corrupt.py) cover every header field, truncation at
every section boundary, offsets past the end, overlapping sections, bad names and
codes, and dimensions whose products overflow 32 and 64 bits. Both readers must
agree on every case, say what is wrong in one line, and never crash.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from crystalc.errors import CrystalError
from crystalc.format.crystal import decode_crystal, encode_crystal
from crystalc.ir.tensor import Quant, Tensor
from crystalc.tokenizer import Tokenizer
from crystalc.train.data import build_tokenizer
from tests.conftest import FIXTURE_SHAPES, random_graph, require_tool
from tests.format.corrupt import all_cases
from tests.format.test_crystal import CHARS, pruned, quantize_by_hand

# under pytest-xdist the file's tests share one worker, which builds its module fixtures
# (the sanitized loader's build) once
pytestmark = pytest.mark.xdist_group("test_corrupt")

# meta.json, the file's last section, is then {"note":"..."} of 65 bytes: it can end one byte into the table
NOTE = "corruption base".ljust(65 - len('{"note":""}'), ".")


def base_files() -> dict[str, bytes]:
    # 65 neurons in the last block: sections of 65 bytes (the frozen mask, int8 temperatures), one past
    # a multiple of 64, which can end exactly one byte into the next section
    shape = dict(FIXTURE_SHAPES["three_blocks_n0_n1"], n_neurons=[0, 1, 65])
    g = random_graph(shape, seed=2, tokenizer={"kind": "char", "chars": CHARS[:19]})
    q = pruned(quantize_by_hand(g, "i8", "group"), [0, 1, 4, 5, 9, 18]).replace(meta={"note": NOTE})
    q = q.map_tensors(_per_tensor)  # all three schemes among the entries corrupt.py picks
    f = random_graph("tied_unnormalised", seed=3, tokenizer={"kind": "hf-tokenizers", "json": "{}"})
    # a byte-level BPE the runtime runs: its tables (tokenizer.bpe.*) beside tokenizer.json, pruned
    spec = build_tokenizer("to be or not to be, that is the question\n" * 8, "bpe:270")
    b = random_graph(dict(FIXTURE_SHAPES["d40_h5"], vocab_size=Tokenizer(spec).vocab_size), seed=4, tokenizer=spec)
    b = pruned(b, list(range(0, b.config.vocab_size, 3)))
    return {"quantized_pruned": encode_crystal(q), "float_tied": encode_crystal(f), "bpe_pruned": encode_crystal(b)}


def _per_tensor(t: Tensor) -> Tensor:
    """pos_embed.weight and blocks.0.attn.q_proj.bias under the tensor scheme (scale and offset stored)."""
    if t.name not in ("pos_embed.weight", "blocks.0.attn.q_proj.bias"):
        return t
    q = Quant("tensor", np.array([0.01], np.float32), np.array([-0.25], np.float32))
    return Tensor(t.name, t.data, q)


BASES = base_files()


def python_verdict(data: bytes) -> str | None:
    """None when the reader accepts the bytes, else its one-line message."""
    try:
        decode_crystal(data)
    except CrystalError as e:
        return str(e)
    return None


@pytest.mark.parametrize("base", sorted(BASES))
def test_python_reader_rejects_every_corruption_with_one_line(base):
    cases = all_cases(BASES[base])
    assert len(cases) > 150
    for label, data, must_fail in cases:
        try:
            msg = python_verdict(data)
        except Exception as e:  # anything but CrystalError escaping is a bug
            pytest.fail(f"{label}: {type(e).__name__} escaped: {e}")
        if must_fail:
            assert msg is not None, f"{label}: accepted"
        if msg is not None:
            assert "\n" not in msg and msg, label


def test_a_section_one_byte_too_long_is_named_as_such():
    """At the boundary the bounds and overlap checks must be what refuses the file (not, say, a JSON
    parse of a section that swallowed a byte of the table): an off-by-one there would go unseen."""
    cases = [(label, data) for label, data, _ in all_cases(BASES["quantized_pruned"]) if "one byte into" in label]
    assert len(cases) == 3
    for label, data in cases:
        msg = python_verdict(data) or ""
        assert "overlap" in msg if "next section" in label else "the section table" in msg, (label, msg)


@pytest.fixture(scope="module")
def sanitized_loader(tmp_path_factory):
    require_tool("gcc")
    import os

    from crystalc.runtime import build_runtime

    os.environ.setdefault("CRYSTALC_CACHE", str(tmp_path_factory.mktemp("cache")))
    return build_runtime(sanitize=True, loader_only=True)


def run_c(exe, path) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(path)], capture_output=True, text=True, timeout=60,
                          env={"ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1", "PATH": "/usr/bin:/bin"})


def run_c_all(exe, tmp_path, blobs: list[bytes]) -> list[subprocess.CompletedProcess]:
    """run_c on each of `blobs`, written to files of their own, two at a time."""
    paths = [_write(tmp_path / f"case{i}.crystal", data) for i, data in enumerate(blobs)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda p: run_c(exe, p), paths))


@pytest.mark.parametrize("base", sorted(BASES))
def test_c_loader_agrees_under_sanitizers(base, sanitized_loader, tmp_path):
    ok = run_c(sanitized_loader, _write(tmp_path / "ok.crystal", BASES[base]))
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr
    cases = all_cases(BASES[base])
    results = run_c_all(sanitized_loader, tmp_path, [data for _, data, _ in cases])
    for (label, data, _), res in zip(cases, results, strict=True):
        py = python_verdict(data)
        assert res.returncode in (0, 2), f"{label}: exit {res.returncode}\n{res.stderr[-3000:]}"
        assert (res.returncode == 0) == (py is None), f"{label}: C exit {res.returncode} ({res.stderr.strip()}), " \
                                                      f"Python {py!r}"
        if res.returncode == 2:
            lines = res.stderr.splitlines()
            assert len(lines) == 1 and "error" in lines[0] and res.stdout == "", f"{label}: {res.stderr!r}"


def test_random_byte_flips_never_crash(sanitized_loader, tmp_path):
    """Random damage, checksum re-sealed, so the flips reach the structural checks.

    Half the files are damaged only in meta.json, the section the runtime checks as
    JSON syntax without reading it.
    """
    from tests.format.corrupt import reseal, table

    rng = np.random.default_rng(0)
    data = BASES["quantized_pruned"]
    meta = next(e for e in table(data)[1] if e.name == "meta.json")
    blobs = []
    for i in range(120):
        b = bytearray(data)
        lo, hi = (meta.offset, meta.offset + meta.length) if i % 2 else (0, len(b) - 4)
        for _ in range(int(rng.integers(1, 6))):
            k = int(rng.integers(lo, hi))
            b[k] = int(rng.choice([rng.integers(0, 256), *b'{}[]":,.-+eE0 \\tnu']))
        blobs.append(reseal(b))
    results = run_c_all(sanitized_loader, tmp_path, blobs)
    for blob, res in zip(blobs, results, strict=True):
        assert res.returncode in (0, 2), res.stderr[-3000:]
        assert (res.returncode == 0) == (python_verdict(blob) is None)


# (meta.json body, valid): padded with spaces, which JSON allows around a value, to the base's section length
JSON_BODIES = [
    ('{"a":1}', True), (' {"a" : [1, -0.5e+3, 2E-2, true, false, null, "x\\u00e9\\n\\\\"], "b": {}} ', True),
    ('{"a":' + "[" * 63 + "]" * 63 + "}", True), ('{"a":' + "[" * 64 + "]" * 64 + "}", False),  # 64 nested deep
    ('{"a":' + "1" * 100 + "}", True), ('{"a":' + "1" * 101 + "}", False), ('{"a":-' + "1" * 99 + "}", True),
    ('{"a":0.' + "5" * 99 + "}", False),
    ('{"a":NaN}', False), ('{"a":-Infinity}', False), ('{"a":1', False), ("[1]", False), ('"a"', False),
    ('{"a":"\x01"}', False), ('{"a":"\\x"}', False), ('{"a":"\\u12G4"}', False), ('{"a":"\\u12"}', False),
    ('{"a":01}', False), ('{"a":.5}', False), ('{"a":1.}', False), ('{"a":1e}', False), ('{"a":-}', False),
    ('{"a":tru}', False), ('{"a":[1,]}', False), ('{,}', False), ('{"a" 1}', False), ('{"a":1}x', False),
    ('{"a":1,"a":2}', True), ("{}", True), ("{1:2}", False), ('{"a":"\t"}', False), ('{"a":"\x7f"}', True),
    # a repeated key's earlier value still counts for the depth; what a double cannot hold, or half a
    # surrogate pair, the writer could not write back
    ('{"a":' + "[" * 64 + "]" * 64 + ',"a":1}', False), ('{"a\\"[":[]}', True),
    ('{"a":1e308}', True), ('{"a":-1e400}', False), ('{"a":1e-400}', True), ('{"a":1.8e308}', False),
    ('{"a":"\\ud83d\\ude00"}', True), ('{"a":"\\ud800"}', False), ('{"a":"\\udc00\\ud800"}', False),
    ('{"a":"\\ud800\\u0041"}', False), ('{"\\udfff":1}', False), ('{"a":"\\uD83D\\uDE00"}', True),
]


def json_files() -> list[tuple[str, bytes]]:
    from tests.format.corrupt import reseal, table

    g = random_graph("d40_h5", seed=4).replace(meta={"note": "x" * 300})
    data = encode_crystal(g)
    meta = next(e for e in table(data)[1] if e.name == "meta.json")
    out = []
    for body, _ in JSON_BODIES:
        raw = body.encode("utf-8").ljust(meta.length)
        assert len(raw) == meta.length, body
        out.append((body, reseal(data[:meta.offset] + raw + data[meta.offset + meta.length:])))
    return out


def test_c_loader_and_python_agree_on_json_sections(sanitized_loader, tmp_path):
    """The runtime never reads meta.json or tokenizer.json, but refuses what Python's reader refuses."""
    cases = json_files()
    results = run_c_all(sanitized_loader, tmp_path, [data for _, data in cases])
    for (body, data), res, (_, valid) in zip(cases, results, JSON_BODIES, strict=True):
        py = python_verdict(data)
        assert (py is None) == valid, f"{body[:80]!r}: Python {py!r}"
        assert res.returncode == (0 if valid else 2), f"{body[:80]!r}: C {res.stderr.strip()!r}"
        if not valid:
            assert res.stderr.count("\n") == 1 and "meta.json" in res.stderr, res.stderr


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def v2_cases() -> list[tuple[str, bytes]]:
    """The seeds' version-2 files: every header field set to odd values, truncations, offsets moved."""
    import struct

    from tests.format.seeds_v2_writer import seeds_v2_bytes
    from tests.format.test_seeds_v2 import state

    cases = []
    for mixed8 in (False, True):
        data = seeds_v2_bytes(state(), n_heads=3, mixed8=mixed8)
        tag = "mixed8" if mixed8 else "float32"
        cases.append((f"{tag} valid", data))
        layout = [("<H", 4), ("<H", 6), ("<I", 8)] + [("<H", 12 + 2 * i) for i in range(10)] + \
                 [("<I", 32 + 4 * i) for i in range(8)]
        for form, off in layout:
            bits = struct.calcsize(form) * 8
            orig = struct.unpack_from(form, data, off)[0]
            for v in {0, 1, orig + 1, orig - 1, (1 << bits) - 1, 1 << (bits - 1), len(data), 64}:
                b = bytearray(data)
                struct.pack_into(form, b, off, v % (1 << bits))
                cases.append((f"{tag} field at {off} = {v}", bytes(b)))
        offsets = struct.unpack_from("<7I", data, 32)
        if mixed8:  # finite scales whose codes dequantize past float32 (the head's w scale, then its b scale)
            for at in (0, 8):
                b = bytearray(data)
                struct.pack_into("<f", b, offsets[5] + at, 3e38)
                cases.append((f"{tag} head scale at +{at} = 3e38", bytes(b)))
        for k in sorted({*offsets, 63, 64, len(data) - 1}):
            cases.append((f"{tag} truncated at {k}", data[:k]))
            b = bytearray(data[:k])
            if k >= 64:
                struct.pack_into("<I", b, 60, k)  # total size patched to match
                cases.append((f"{tag} truncated at {k}, total patched", bytes(b)))
    # no neurons: the empty field section may sit at or inside another section (valid: it has no bytes to share;
    # C once refused it or not, as its qsort ordered the tie, and Python refused it inside one)
    sd = dict(state())
    for name in ("positions", "values", "temperature"):
        sd[f"blocks.0.field.{name}"] = sd[f"blocks.0.field.{name}"][:0]
    empty_geo = bytearray(seeds_v2_bytes(sd, n_heads=3))
    for k in (0, 1, 2, 4, 5, 6):  # at each other section's start, and inside it
        for into in (0, 4):
            struct.pack_into("<I", empty_geo, 32 + 4 * 3, struct.unpack_from("<I", empty_geo, 32 + 4 * k)[0] + into)
            cases.append((f"no neurons, geo {into} bytes into section {k}", bytes(empty_geo)))
    return cases


def test_c_loader_agrees_on_seeds_v2_files(sanitized_loader, tmp_path):
    cases = v2_cases()
    results = run_c_all(sanitized_loader, tmp_path, [data for _, data in cases])
    rejected = 0
    for (label, data), res in zip(cases, results, strict=True):
        py = python_verdict(data)
        assert res.returncode in (0, 2), f"{label}: exit {res.returncode}\n{res.stderr[-3000:]}"
        assert (res.returncode == 0) == (py is None), f"{label}: C {res.stderr.strip()!r}, Python {py!r}"
        rejected += res.returncode == 2
        if res.returncode == 2:
            assert len(res.stderr.splitlines()) == 1, f"{label}: {res.stderr!r}"
    assert rejected > len(cases) // 2


def test_python_reader_random_mutations_only_raise_crystal_error():
    """Random bytes, 64-bit words and truncations over both versions: nothing but CrystalError escapes."""
    import struct
    import warnings

    from tests.format.corrupt import reseal
    from tests.format.seeds_v2_writer import seeds_v2_bytes
    from tests.format.test_seeds_v2 import state

    bases = [*BASES.values(), seeds_v2_bytes(state(), n_heads=3), seeds_v2_bytes(state(), n_heads=3, mixed8=True)]
    rng = np.random.default_rng(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning would be a missed check
        for it in range(2000):
            b = bytearray(bases[it % len(bases)])
            for _ in range(int(rng.integers(1, 8))):
                r = rng.random()
                if r < 0.5:
                    b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
                elif r < 0.8:
                    b[int(rng.integers(0, 64))] = int(rng.integers(0, 256))
                else:
                    struct.pack_into("<Q", b, int(rng.integers(0, len(b) - 8)), int(rng.integers(0, 2**63)))
            if rng.random() < 0.2:
                b = b[: int(rng.integers(0, len(b)))]
            data = bytes(b)
            if len(data) > 8 and data[4] == 3 and rng.random() < 0.8:
                data = reseal(data)
            try:
                msg = python_verdict(data)
            except Exception as e:
                pytest.fail(f"mutation {it}: {type(e).__name__} escaped: {e}")
            assert msg is None or "\n" not in msg
