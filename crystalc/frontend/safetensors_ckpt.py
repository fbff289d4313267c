"""Reading `.safetensors` weights with a JSON config beside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crystalc.errors import CrystalError
from crystalc.frontend.raw import RawCheckpoint, check_dtype, torch_array, torch_dtype_name


def config_path_for(path: Path) -> Path | None:
    """MODEL.json, MODEL.config.json, or config.json in the same folder, first found."""
    for cand in (path.with_suffix(".json"), path.with_suffix(".config.json"), path.parent / "config.json"):
        if cand.is_file():
            return cand
    return None


def _widened(a: np.ndarray) -> np.ndarray:
    """bfloat16 and float8 arrays as float32 (exactly). numpy has those types once ml_dtypes is imported
    (onnx imports it), and safetensors then reads such a file through numpy after all."""
    name = a.dtype.name
    return a.astype(np.float32) if name == "bfloat16" or name.startswith("float8") else a


def _through_torch(path: Path) -> dict:
    """The tensors of a file whose dtypes numpy has no type for (bfloat16, the float8s), widened to float32
    (exactly: each is a subset of float32's values) by torch."""
    try:  # (safetensors.torch imports torch: without it, an ImportError here)
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CrystalError(f"{path}: bfloat16 or float8 tensors need torch to be read") from None
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise CrystalError(f"{path}: not a readable safetensors file ({e})") from None
    for k, v in tensors.items():
        check_dtype(path, k, torch_dtype_name(v))  # before the conversion: float4 has none
    return {k: torch_array(v) for k, v in tensors.items()}


def read_safetensors(path: Path) -> RawCheckpoint:
    try:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
    except ImportError:
        raise CrystalError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from None
    try:
        arrays = load_file(str(path))
    except (TypeError, AttributeError):  # a dtype numpy lacks (bfloat16, float8): torch reads those
        state = _through_torch(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CrystalError(f"{path}: not a readable safetensors file ({e})") from None
    else:
        for k, a in arrays.items():
            check_dtype(path, k, a.dtype.name)  # with ml_dtypes numpy has float4 and float6 too
        state = {k: _widened(a) for k, a in arrays.items()}
    cfg_path = config_path_for(path)
    config = tokenizer = None
    meta: dict = {}
    if cfg_path is not None:
        try:
            doc = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:  # RecursionError: nesting too deep to decode
            raise CrystalError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(doc, dict):
            raise CrystalError(f"{cfg_path}: expected a JSON object")
        # Either the config itself, or {"config": ..., "tokenizer": ..., "meta": ...}.
        if isinstance(doc.get("config"), dict):
            config, tokenizer, meta = doc["config"], doc.get("tokenizer"), doc.get("meta") or {}
            if not isinstance(meta, dict):
                raise CrystalError(f"{cfg_path}: 'meta' should be an object, not {type(meta).__name__}")
        else:
            config = doc
    return RawCheckpoint(str(path), dict(state), config, tokenizer, meta,
                         None if cfg_path is None else str(cfg_path))
