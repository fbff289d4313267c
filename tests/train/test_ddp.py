"""torchrun: two gloo processes train a few steps (with growth and freezing) and end as identical replicas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


# Two processes x 16 steps of a D=16 model: about 30 s on a loaded 2-core machine, so CI runs it.
@pytest.mark.slow
def test_two_ranks_agree(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.train.ddp_worker", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["meta"]["world_size"] == 2 and a["meta"]["curve"] == b["meta"]["curve"]
    assert a["meta"]["neurons"][0] > 4  # growth happened, identically on both ranks
    ck = torch.load(tmp_path / "model.pt", weights_only=True)  # rank 0 wrote the checkpoint
    assert all(torch.equal(ck["model"][k], a["model"][k]) for k in a["model"])
