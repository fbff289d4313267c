"""Reading `.pt` checkpoints: the spec's wrapper dict, the seeds' {"model", "config"}, or a bare state_dict.

The only module of the front end that imports torch, and it does so lazily.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from crystalc.errors import CrystalError
from crystalc.frontend.raw import RawCheckpoint


def read_torch_checkpoint(path: Path) -> RawCheckpoint:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            # a damaged pickle can make torch warn on stderr before it fails; our one line says what went wrong
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file object: torch would treat a .safetensors name as one
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch.load only parses here (weights_only), and a damaged file reaches it with any of a dozen
        # exception types, assertions included (found by mutating checkpoints): all of them mean "unreadable".
        said = str(e)
        if said.startswith("Weights only load failed"):  # torch's advice to turn the safety off is not ours
            found = re.search(r"GLOBAL (\S+)", said)
            if found or "Unsupported operand" not in said:
                what = f" ({found.group(1)})" if found else ""
                raise CrystalError(f"{path}: refused: it holds pickled objects other than tensors{what}; crystalc "
                                   "loads weights only") from None
            # an opcode the safe unpickler lacks (pickle's protocol 4 framing): a pickle, but not torch.save's
            raise CrystalError(f"{path}: not a PyTorch checkpoint: a plain pickle (torch.save writes a zip "
                               "archive), which crystalc does not read") from None
        first = said.strip().splitlines()[0] if said.strip() else type(e).__name__
        raise CrystalError(f"{path}: not a readable PyTorch checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise CrystalError(f"{path}: expected a dict, found {type(obj).__name__}")
    config: dict[str, Any] | None = None
    tokenizer = None
    meta: dict[str, Any] = {}
    if "model" in obj and isinstance(obj["model"], dict):
        state = obj["model"]
        if obj.get("format", "crystalc-checkpoint") != "crystalc-checkpoint":
            raise CrystalError(f"{path}: unknown checkpoint format {obj.get('format')!r}")
        if obj.get("version", 1) != 1:
            raise CrystalError(f"{path}: checkpoint version {obj.get('version')!r}; this crystalc reads 1")
        config = obj.get("config")
        if config is not None and not isinstance(config, dict):
            raise CrystalError(f"{path}: 'config' is a {type(config).__name__}, expected a dict")
        tokenizer = obj.get("tokenizer")
        meta = obj.get("meta") or {}
        if not isinstance(meta, dict):
            raise CrystalError(f"{path}: 'meta' should be a dict, not {type(meta).__name__}")
        if "format" not in obj:
            meta = {}  # the seeds' {"model", "config"}: their extras are not ours to carry
    else:
        state = obj
    arrays: dict[str, np.ndarray] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise CrystalError(f"{path}: state_dict key {k!r} is not a string")
        if not isinstance(v, torch.Tensor):
            raise CrystalError(f"{path}: {k} is a {type(v).__name__}, expected a tensor")
        if v.device.type == "meta":
            raise CrystalError(f"{path}: {k} is a meta tensor: it has a shape but no data")
        if v.is_quantized or v.layout != torch.strided:
            kind = "quantized" if v.is_quantized else f"{v.layout} (not dense)"
            raise CrystalError(f"{path}: {k} is a {kind} tensor: save dense float tensors "
                               "(.dequantize() or .to_dense() first)")
        if v.dtype == torch.bool:
            arrays[k] = v.numpy().copy()
        elif v.is_floating_point():
            arrays[k] = v.detach().to(torch.float32).numpy().copy()
        else:
            arrays[k] = v.numpy().copy()
    return RawCheckpoint(str(path), arrays, config, tokenizer, dict(meta))
