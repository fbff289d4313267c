"""What every checkpoint reader produces before lowering: arrays, config, tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crystalc.errors import CrystalError

# The dtypes the readers take, by the name torch and numpy (with ml_dtypes) both give them. A list, not "any
# float": torch has floats it cannot convert (float4_e2m1fn_x2), and numpy lacks most narrow ones. The floats
# are widened to float32 (exactly, but for float64, whose overflow is then refused as Inf); the integers and
# bool reach lower, which takes them for a frozen mask and refuses them for weights.
FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "float8_e4m3fn", "float8_e4m3fnuz",
                          "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"})
OTHER_DTYPES = frozenset({"bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64"})


def check_dtype(path: object, key: str, name: str) -> None:
    """`name`: a torch dtype's name without "torch." (torch_dtype_name), or a numpy dtype's."""
    if name not in FLOAT_DTYPES and name not in OTHER_DTYPES:
        raise CrystalError(f"{path}: {key}: dtype {name} is not one crystalc reads")


def torch_dtype_name(t: Any) -> str:
    """A torch tensor's dtype by the name numpy gives it too ("float16", not "torch.float16")."""
    return str(t.dtype).removeprefix("torch.")


def torch_array(t: Any) -> np.ndarray:
    """A torch tensor of a dtype check_dtype took, as a numpy array of its own: floats widened to float32."""
    import torch

    t = t.detach()  # a saved Parameter may require grad, and numpy() refuses one that does
    if torch_dtype_name(t) in FLOAT_DTYPES:
        t = t.to(torch.float32)
    return t.numpy().copy()


@dataclass
class RawCheckpoint:
    source: str
    state: dict[str, np.ndarray]
    config: dict[str, Any] | None = None
    tokenizer: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    config_source: str | None = None  # the file the config came from, when not `source` (safetensors' JSON)
