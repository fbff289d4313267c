"""Seeded mutations of a valid checkpoint: every one loads or is one line of CrystalError, never a traceback.

A bounded, deterministic version of the mutation runs that found the front end's
mistyped-config, metadata, tokenizer and torch.load-assertion crashes; the loader
of .crystal files has its own (tests/format/test_corrupt.py, tests/fuzz/).
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from crystalc.errors import CrystalError
from crystalc.frontend import load_model
from tests.conftest import random_graph

CHARS = "abcdefghijklmnopqrstuvw"
ODD_VALUES: list[Any] = [0, -1, 1, 3, 2**31, 2**63, 1.5, float("nan"), float("inf"), "x", "", None, True, [], {},
                         [1, 2], {"a": 1}, "char", "hf-tokenizers", "a\nb"]


def _base() -> dict[str, Any]:
    g = random_graph("d40_h5", seed=3, tokenizer={"kind": "char", "chars": CHARS})
    return {"format": "crystalc-checkpoint", "version": 1, "config": g.config.to_dict(),
            "model": {k: torch.from_numpy(np.array(v)) for k, v in g.state_dict().items()},
            "tokenizer": dict(g.tokenizer), "meta": {"curve": [], "steps_done": 5}}


def _mutate_value(rng: random.Random, v: Any, depth: int = 0) -> Any:
    if isinstance(v, dict) and v and depth < 3:
        v = dict(v)
        k = rng.choice(sorted(v, key=str))
        r = rng.random()
        if r < 0.2:
            del v[k]
        elif r < 0.3:
            v[rng.choice(["extra", "kind", "chars", "json", "vocab_size"])] = rng.choice(ODD_VALUES)
        else:
            v[k] = _mutate_value(rng, v[k], depth + 1)
        return v
    if isinstance(v, str) and v and rng.random() < 0.5:
        return v[: rng.randrange(len(v))] + rng.choice(["", v[0], "\x00"])
    return rng.choice(ODD_VALUES)


def _mutate(rng: random.Random, ckpt: dict[str, Any]) -> dict[str, Any]:
    ckpt = dict(ckpt)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["config", "tokenizer", "meta", "model", "model", "version", "format"])
        if key != "model":
            ckpt[key] = _mutate_value(rng, ckpt.get(key))
            continue
        state = dict(ckpt["model"])
        name = rng.choice(sorted(state))
        r = rng.random()
        if r < 0.25:
            del state[name]
        elif r < 0.5:
            state[name] = torch.zeros([rng.choice([0, 1, 5, 40])] * max(1, state[name].dim()))
        elif r < 0.7:
            state[name] = state[name].to(rng.choice([torch.float16, torch.float64, torch.int64, torch.bool]))
        elif r < 0.85:
            state[name] = state[name].flatten()[:3]
        else:
            state[rng.choice(["blocks.1.ffn.fc1.weight", "ln_f.weight", "x"])] = torch.ones(2)
        ckpt["model"] = state
    return ckpt


def _outcome(path: Path) -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            load_model(path)
        except CrystalError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            return "rejected"
        finally:
            assert not caught, [str(w.message) for w in caught]  # a warning would be a second line on stderr
    return "loaded"


@pytest.mark.parametrize("seed", range(4))
def test_structured_mutations_load_or_fail_cleanly(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    base = _base()
    outcomes = []
    for i in range(60):
        path = tmp_path / f"m{i}.pt"
        torch.save(_mutate(rng, base), path)
        outcomes.append(_outcome(path))
    assert "rejected" in outcomes  # the mutations reach the checks


@pytest.mark.parametrize("seed", range(2))
def test_byte_mutations_load_or_fail_cleanly(tmp_path: Path, seed: int) -> None:
    rng = random.Random(100 + seed)
    src = tmp_path / "base.pt"
    torch.save(_base(), src)
    data = src.read_bytes()
    for i in range(150):
        d = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.8:  # the pickle and the zip's headers sit in the first few KB
                d[rng.randrange(min(len(d), 4096))] = rng.randrange(256)
            else:
                d = d[: rng.randrange(len(d))]
        path = tmp_path / f"b{i}.pt"
        path.write_bytes(bytes(d))
        _outcome(path)
