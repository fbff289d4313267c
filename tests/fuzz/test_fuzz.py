"""A short bounded libFuzzer run of the runtime's .crystal loader (fuzz/crystal_load_fuzz.c).

Seeded with valid files of both versions; ASan and UBSan turn any out-of-bounds
read, overflow or crash into a failure, and the target traps when a rejection
lacks its one-line message. CRYSTALC_FUZZ_SECONDS sets the budget (default 30).
"""

from __future__ import annotations

import os
import subprocess

from tests.conftest import REPO, require_tool, tool_missing
from tests.format.seeds_v2_writer import seeds_v2_bytes
from tests.format.test_corrupt import BASES


def test_loader_survives_a_bounded_fuzz_run(tmp_path):
    require_tool("clang")
    # Debian ships clang's runtimes apart (libclang-rt-dev): without libFuzzer's, clang compiles but cannot link
    probe = subprocess.run(["clang", "-x", "c", "-fsanitize=fuzzer", "-o", os.devnull, "-"], capture_output=True,
                           input=b"int LLVMFuzzerTestOneInput(const char *d, long n) { return 0; }\n")
    if probe.returncode != 0:
        tool_missing("missing libFuzzer's runtime (clang -fsanitize=fuzzer cannot link: install libclang-rt-dev)")
    exe = tmp_path / "crystal_load_fuzz"
    build = subprocess.run(
        ["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
         f"-I{REPO / 'templates' / 'c'}", str(REPO / "fuzz" / "crystal_load_fuzz.c"),
         str(REPO / "templates" / "c" / "crystal_forward.c"), "-o", str(exe), "-lm"],
        capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, data in BASES.items():
        (corpus / f"{name}.crystal").write_bytes(data)
    from tests.format.test_seeds_v2 import state

    (corpus / "seeds_v2.crystal").write_bytes(seeds_v2_bytes(state(), n_heads=3))
    (corpus / "seeds_v2_mixed8.crystal").write_bytes(seeds_v2_bytes(state(), n_heads=3, mixed8=True))
    seconds = int(os.environ.get("CRYSTALC_FUZZ_SECONDS", "30"))
    run = subprocess.run([str(exe), "-seed=1", f"-max_total_time={seconds}", "-rss_limit_mb=2048", "-timeout=20",
                          f"-artifact_prefix={tmp_path}/", str(corpus)],
                         capture_output=True, text=True, timeout=seconds + 120)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr
