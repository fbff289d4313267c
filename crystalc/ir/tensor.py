"""Typed tensors of the IR and the one definition of dequantization.

A tensor is float32, bool, or integer codes with quantization parameters. Every
consumer (interpreter, .crystal writer, every backend) reads real values through
`Tensor.values()` or reproduces `dequantize()` exactly, so there is one meaning of
a quantized tensor in the whole toolchain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystalc.errors import CrystalError

DTYPES = {"f32": np.float32, "i8": np.int8, "i16": np.int16, "bool": np.bool_}
QUANT_SCHEMES = ("tensor", "row", "group")


def read_only(array: np.ndarray) -> np.ndarray:
    """A view nothing can write through: passes build new tensors, so an in-place write to one a graph holds
    would be a bug (another graph may share it), and numpy now raises at it."""
    view = array.view()
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class Quant:
    """How integer codes map back to float32: value = float(code) * scale + offset.

    scheme "tensor": scale and offset have shape (1,); the seeds' asymmetric
    min/max mapping. scheme "row": shape (rows,), symmetric (offset 0) per row of a
    2-D tensor (a 1-D tensor is one row). scheme "group": shape (rows, ceil(cols / group)) with `group`
    consecutive columns sharing a scale (the last group of a row may be narrower), symmetric. The arithmetic
    is float32 throughout: multiply, round to float32, add, round to float32 (no fused multiply-add).
    """

    scheme: str
    scale: np.ndarray
    offset: np.ndarray
    group: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", read_only(self.scale))
        object.__setattr__(self, "offset", read_only(self.offset))

    def expanded(self, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """scale and offset broadcast to `shape`."""
        if self.scheme == "tensor":
            return (np.broadcast_to(self.scale.reshape(()), shape),
                    np.broadcast_to(self.offset.reshape(()), shape))
        if self.scheme == "row":
            if len(shape) < 2:  # a 1-D tensor is a single row
                return (np.broadcast_to(self.scale.reshape(()), shape),
                        np.broadcast_to(self.offset.reshape(()), shape))
            lead = (shape[0],) + (1,) * (len(shape) - 1)
            return (np.broadcast_to(self.scale.reshape(lead), shape),
                    np.broadcast_to(self.offset.reshape(lead), shape))
        group_of = np.arange(shape[1]) // self.group  # column -> its group; a group may be wider than the row
        return self.scale[:, group_of], self.offset[:, group_of]


def dequantize(codes: np.ndarray, quant: Quant) -> np.ndarray:
    scale, offset = quant.expanded(codes.shape)
    prod = (codes.astype(np.float32) * scale.astype(np.float32)).astype(np.float32)
    return (prod + offset.astype(np.float32)).astype(np.float32)


@dataclass(frozen=True, eq=False)
class Tensor:
    """A named, typed array. `data` holds float32 values or integer codes."""

    name: str
    data: np.ndarray
    quant: Quant | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", read_only(self.data))

    @property
    def dtype(self) -> str:
        for name, t in DTYPES.items():
            if self.data.dtype == t:
                return name
        raise CrystalError(f"{self.name}: unsupported dtype {self.data.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes as stored: the data, and a quantized tensor's scales (and offsets, which only the per-tensor
        scheme has; the symmetric ones' zeros are not stored)."""
        if self.quant is None:
            return int(self.data.nbytes)
        offsets = self.quant.offset.nbytes if self.quant.scheme == "tensor" else 0
        return int(self.data.nbytes) + self.quant.scale.nbytes + offsets

    def values(self) -> np.ndarray:
        """The float32 values the model computes with."""
        if self.quant is None:
            return self.data
        return dequantize(self.data, self.quant)

    def verify(self, shape: tuple[int, ...], dtypes: tuple[str, ...] = ("f32",)) -> None:
        if self.shape != tuple(shape):
            raise CrystalError(f"{self.name}: shape {list(self.shape)}, expected {list(shape)}")
        if self.dtype not in dtypes:
            raise CrystalError(f"{self.name}: dtype {self.dtype}, expected {' or '.join(dtypes)}")
        if self.dtype in ("i8", "i16"):
            q = self.quant
            if q is None:
                raise CrystalError(f"{self.name}: integer tensor without quantization parameters")
            if q.scheme not in QUANT_SCHEMES:
                raise CrystalError(f"{self.name}: unknown quantization scheme {q.scheme!r}")
            want: tuple[int, ...] = (shape[0],) if q.scheme == "row" and len(shape) == 2 else (1,)
            if q.scheme == "group":
                integral = isinstance(q.group, (int, np.integer)) and not isinstance(q.group, bool)
                if len(shape) != 2 or not integral or q.group < 1:
                    raise CrystalError(f"{self.name}: group quantization needs a 2-D tensor and group >= 1")
                want = (shape[0], -(-shape[1] // q.group))
            for what, arr in (("scale", q.scale), ("offset", q.offset)):
                if arr.dtype != np.float32 or arr.shape != want:
                    raise CrystalError(
                        f"{self.name}: quantization {what} has shape {list(arr.shape)} "
                        f"dtype {arr.dtype}, expected {list(want)} float32"
                    )
                if not np.all(np.isfinite(arr)):
                    raise CrystalError(f"{self.name}: quantization {what} holds NaN or Inf")
            if q.scheme != "tensor" and np.any(q.offset != 0):  # row and group scales are symmetric
                raise CrystalError(f"{self.name}: nonzero offsets under the symmetric {q.scheme} scheme")
            with np.errstate(over="ignore", invalid="ignore"):  # finite scales can still make Inf values
                finite = np.all(np.isfinite(dequantize(self.data, q)))
            if not finite:
                raise CrystalError(f"{self.name}: a code times its scale, plus its offset, overflows float32")
        elif self.quant is not None:
            raise CrystalError(f"{self.name}: {self.dtype} tensor with quantization parameters")
        if self.dtype == "f32" and not np.all(np.isfinite(self.data)):
            bad = int(np.size(self.data) - np.count_nonzero(np.isfinite(self.data)))
            raise CrystalError(f"{self.name}: {bad} NaN/Inf value(s) in a tensor of shape {list(self.shape)}")


def f32(name: str, array: np.ndarray) -> Tensor:
    return Tensor(name, np.ascontiguousarray(array, dtype=np.float32))
