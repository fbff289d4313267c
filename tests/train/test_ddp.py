"""torchrun: two gloo processes train a few steps (with growth and freezing) and end as identical replicas."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def two_ranks(out: Path, case: str = "grow") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "tests.train.ddp_worker", str(out), case],
        capture_output=True, text=True, timeout=240, cwd=REPO, env=env)


# Two processes x 16 steps of a D=16 model: about 30 s on a loaded 2-core machine, so CI runs it.
@pytest.mark.slow
def test_two_ranks_agree(tmp_path: Path) -> None:
    r = two_ranks(tmp_path)
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
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # an audit: torch's FutureWarning on broadcast_buffers


@pytest.mark.slow
def test_blocks_without_neurons_train_on_two_ranks(tmp_path: Path) -> None:
    # found by an audit: a field of no neurons leaves its empty parameters without a gradient, which DDP
    # refused at the second step unless told to look for unused parameters
    r = two_ranks(tmp_path, "no_field")
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert a["meta"]["neurons"] == [0]


@pytest.mark.slow
def test_a_loss_gone_nan_on_one_rank_stops_both(tmp_path: Path) -> None:
    # found by an audit: the rank whose loss was NaN stopped while the other waited at the next
    # gradient all-reduce; now both stop at the same step with one line each
    r = two_ranks(tmp_path, "nan_on_rank1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1: training diverged at step 3 (loss nan)" in r.stdout, r.stdout
    assert "rank 0: training diverged at step 3 (another rank's loss nan)" in r.stdout, r.stdout
    assert not (tmp_path / "model.pt").exists()
