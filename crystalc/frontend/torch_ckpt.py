"""Reading `.pt` checkpoints: the spec's wrapper dict, the seeds' {"model", "config"}, or a bare state_dict.

torch is imported lazily, as by the other readers that need it (bfloat16 .safetensors, raw.torch_array):
a .crystal or plain .safetensors never loads it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from crystalc.config import MAX_ELEMENTS
from crystalc.errors import CrystalError
from crystalc.frontend.raw import RawCheckpoint, check_dtype, torch_array, torch_dtype_name


def _refuse_compressed(path: Path) -> None:
    """torch.save stores its zip's entries; torch.load would inflate a deflated one, and a small file of them
    can inflate to gigabytes (a zip bomb). Only the central directory is read here, no entry."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            packed = next((i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED), None)
    except Exception:  # not a zip (the legacy pickle format), or a damaged one: torch.load says which
        return
    if packed is not None:
        raise CrystalError(f"{path}: {packed.filename[:200]}: a compressed entry; torch.save writes none, and "
                           "crystalc does not inflate them")


MAX_META_ELEMENTS = 1 << 20  # in meta's tensors together: a record (a training curve), not weights


def _view(v: Any) -> tuple[Any, ...]:
    """What a tensor reads: the same for every name of one tied or shared parameter, which is read once."""
    return (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)


def _check_sizes(path: Path, tensors: dict[str, Any]) -> None:
    """Before anything is copied: each tensor's elements must lie in its own data (an expanded tensor, stride 0,
    holds a huge shape in a few bytes: a 49 KB file once became 1.2 GB here), and no more than a model's many.
    Together the distinct views may span their data at most twice (a tied head, blocks sharing one module, and
    slices of one buffer are each read once), or many overlapping views of one storage would multiply it."""
    viewed: dict[tuple[Any, ...], int] = {}
    stored: dict[tuple[int, int], int] = {}
    for k, v in tensors.items():
        n, storage = v.numel(), v.untyped_storage()
        if n * v.element_size() > storage.nbytes():
            raise CrystalError(f"{path}: {k}: shape {list(v.shape)} is larger than the data it holds")
        if n > MAX_ELEMENTS:
            raise CrystalError(f"{path}: {k}: {n} elements, more than {MAX_ELEMENTS}")
        viewed[_view(v)] = n * v.element_size()
        stored[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    if sum(viewed.values()) > 2 * sum(stored.values()):
        raise CrystalError(f"{path}: its tensors view {sum(viewed.values())} bytes in {sum(stored.values())} bytes "
                           "of data: more than twice, which no model's shared weights need")


def _meta_tensors(o: Any, where: str, out: dict[str, Any]) -> dict[str, Any]:
    """The tensors in a meta, by where they lie ('meta.curve[3]'), for the same checks as the weights'."""
    import torch

    if isinstance(o, torch.Tensor):
        out[where] = o
    elif isinstance(o, dict):
        for k, v in o.items():
            _meta_tensors(v, f"{where}.{k}", out)
    elif isinstance(o, (list, tuple, set, frozenset)):
        for i, v in enumerate(o):
            _meta_tensors(v, f"{where}[{i}]", out)
    return out


def read_torch_checkpoint(path: Path) -> RawCheckpoint:
    import warnings

    import torch

    _refuse_compressed(path)
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
        version = obj.get("version", 1)
        if isinstance(version, bool) or not isinstance(version, int):  # True == 1; a tensor's != is a tensor
            said = repr(version)[:50] if isinstance(version, (bool, float, str)) else f"a {type(version).__name__}"
            raise CrystalError(f"{path}: checkpoint version {said}, not an integer; this crystalc reads 1")
        if version != 1:
            # str() of an int of thousands of digits raises
            said = str(version) if abs(version) < 10**12 else "beyond 10**12"
            raise CrystalError(f"{path}: checkpoint version {said}; this crystalc reads 1")
        config = obj.get("config")
        if config is not None and not isinstance(config, dict):
            raise CrystalError(f"{path}: 'config' is a {type(config).__name__}, expected a dict")
        tokenizer = obj.get("tokenizer")
        given_meta = obj.get("meta")  # not `or {}`: a tensor has no truth value, and a 0 or [] is not a meta
        if given_meta is not None and not isinstance(given_meta, dict):
            raise CrystalError(f"{path}: 'meta' should be a dict, not {type(given_meta).__name__}")
        meta = given_meta or {}
        if "format" not in obj:
            meta = {}  # the seeds' {"model", "config"}: their extras are not ours to carry
    else:
        state = obj
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
        check_dtype(path, k, torch_dtype_name(v))
    _check_sizes(path, state)
    try:
        in_meta = _meta_tensors(meta, "meta", {})
    except RecursionError:
        raise CrystalError(f"{path}: its meta is nested too deep") from None
    _check_sizes(path, in_meta)
    if sum(v.numel() for v in in_meta.values()) > MAX_META_ELEMENTS:  # each would become a list of Python numbers
        raise CrystalError(f"{path}: its meta holds tensors of more than {MAX_META_ELEMENTS} elements together: "
                           "a record, not weights")
    arrays: dict[str, np.ndarray] = {}
    read: dict[tuple[Any, ...], np.ndarray] = {}  # one copy for the names of one view (a tied or shared weight)
    for k, v in state.items():
        key = _view(v)
        if key not in read:
            read[key] = torch_array(v)
        arrays[k] = read[key]
    return RawCheckpoint(str(path), arrays, config, tokenizer, dict(meta))
