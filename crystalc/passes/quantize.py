"""The quantize pass: float32 weights -> int8 / int16 codes with scales.

Modes (the seeds' names):
  int8, int16    every float tensor, embeddings included
  mixed, mixed8  token_embed and pos_embed stay float32, the rest int16 / int8
                 (a tied head reads the float32 embedding, so it stays float32 too)

Granularity:
  tensor   one scale and offset per tensor: the seeds' asymmetric min/max mapping
           (scale = (max - min) / (2 * qmax), offset = min + qmax * scale,
           code = clip(round((x - offset) / scale), -qmax, qmax)), computed in float32
           as the seeds' numpy code computes it under numpy 2.
  row      one symmetric scale per row (scale = max|row| / qmax, offset 0).
  group:N  one symmetric scale per N consecutive columns of each row; the last group
           of a row is shorter when the column count is not a multiple of N.

Decisions this module makes (and why):
- 1-D tensors (biases, LayerNorm gains and shifts, field temperatures) are quantized
  too, as one row: "int8 of everything" then really is everything, as the seeds'
  MIXED8 head bias was. They are a fraction of a percent of the bytes either way.
  Under group:N a 1-D tensor gets one row scale (the IR's group scheme is 2-D only).
- The bool frozen mask stays bool: it is not a weight.
- A tensor that is already quantized is requantized from its dequantized values,
  so a .crystal input composes with the pass like a .pt input.
- An empty or all-zero tensor, row or group, and a constant tensor under the tensor
  scheme, get scale 0: every code is 0 and dequantization returns the constant exactly,
  with no division by zero. (A constant non-zero row under a symmetric scheme is an
  ordinary row: scale c/qmax, within half a step.)

Rounding is to the nearest code unless calibration text is given: then the linear layers'
codes are chosen to keep their outputs close (crystalc.passes.calibrate), same scales.

Dequantization is not defined here: crystalc.ir.tensor.dequantize is the one definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crystalc.config import FLOAT32_MAX, MAX_DIM
from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph
from crystalc.ir.tensor import Quant, Tensor
from crystalc.passes.calibrate import calibrated_tensor, input_grams

MODES = ("int8", "int16", "mixed", "mixed8")
_BITS = {"int8": 8, "int16": 16, "mixed": 16, "mixed8": 8}
_FLOAT_KEPT_IN_MIXED = ("token_embed.weight", "pos_embed.weight")


@dataclass(frozen=True)
class Granularity:
    scheme: str  # "tensor" | "row" | "group"
    group: int = 0

    def __str__(self) -> str:
        return f"group:{self.group}" if self.scheme == "group" else self.scheme


def parse_granularity(text: str) -> Granularity:
    """`tensor`, `row` or `group:N` (N >= 1)."""
    t = str(text).strip()
    if t in ("tensor", "row"):
        return Granularity(t)
    if t.startswith("group:"):
        n = t[len("group:"):]
        # isdigit alone takes '²' and '١٢'; the length first, as int() refuses past 4,300 digits
        if n.isascii() and n.isdigit() and len(n.lstrip("0")) <= len(str(MAX_DIM)) and 1 <= int(n) <= MAX_DIM:
            return Granularity("group", int(n))
    raise CrystalError(f"granularity must be tensor, row or group:N with 1 <= N <= {MAX_DIM}, got {text!r}")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CrystalError(f"quantization mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _int_type(bits: int) -> tuple[type[np.integer], int]:
    return (np.int8, 127) if bits == 8 else (np.int16, 32767)


def quantize_tensor_minmax(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.float32, np.float32]:
    """The seeds' per-tensor mapping, in float32 arithmetic; returns (codes, scale, offset)."""
    itype, qmax = _int_type(bits)
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        return np.zeros(x.shape, dtype=itype), np.float32(0), np.float32(0)
    vmin, vmax = x.min(), x.max()
    with np.errstate(over="ignore", invalid="ignore"):  # a span past float32's range: inf, refused below
        scale = np.float32((vmax - vmin) / np.float32(2 * qmax))
        offset = np.float32(vmin + np.float32(qmax) * scale)
    # a constant tensor: codes 0, offset == the constant; a non-finite scale: the caller refuses the tensor
    if scale == 0 and vmax == vmin or not (np.isfinite(scale) and np.isfinite(offset)):
        return np.zeros(x.shape, dtype=itype), scale, offset
    # a scale among float32's subnormals, as _roomy_scales: one step up for the scale's rounding, and one for the
    # offset's at most (bounded: a loop widening by ulps would take hours where no step helps)
    for _ in range(2):
        if _spans(scale, offset, vmin, vmax, qmax):
            break
        scale = np.nextafter(scale, np.float32(np.inf))
        offset = np.float32(vmin + np.float32(qmax) * scale)
    codes = np.clip(np.round((x - offset) / scale), -qmax, qmax)
    return codes.astype(itype), scale, offset


def _spans(scale: np.float32, offset: np.float32, vmin: np.float32, vmax: np.float32, qmax: int) -> bool:
    """Whether codes -qmax..qmax reach min and max within half a step, or within float32's own rounding of
    them: a span narrow against its values (1e6 and 1e6 + 1/16) has a step far below their ulp, and its
    offset is rounded by a whole ulp, which dequantizing rounds away again."""
    if scale == 0:  # min < max here: a span that rounded to 0
        return False
    with np.errstate(over="ignore"):  # the spacing at float32's largest value: inf, which reaches anything
        slack = 4 * float(np.spacing(np.maximum(np.abs(vmin), np.abs(vmax))))
    reach = (qmax + 0.5) * float(scale) + slack
    return float(vmin) - float(offset) >= -reach and float(vmax) - float(offset) <= reach


def _roomy_scales(scale: np.ndarray, amax: np.ndarray, qmax: int) -> np.ndarray:
    """Scales whose codes reach each row's largest |x| within half a step. A float32 scale among the
    subnormals (a row below 1e-36 or so) holds few digits: rounded down, amax / scale passed qmax + 1/2 and
    the largest codes clipped (36 half-steps off, seen), or the scale was 0 for a row that is not. The next
    float32 up is enough there (it adds a whole spacing, the rounding took at most half of one); a scale of
    normal float32 is never short."""
    short = scale.astype(np.float64) * (qmax + 0.5) < amax
    scale = np.where(short, np.nextafter(scale, np.float32(np.inf)), scale)
    # at the other end, a row reaching float32's largest value: amax / qmax rounded up made qmax x scale
    # overflow, and a scale an ulp smaller still holds amax within a millionth of a step
    over = scale.astype(np.float64) * qmax > FLOAT32_MAX
    return np.where(over, np.nextafter(scale, np.float32(0)), scale).astype(np.float32)


def _symmetric(x2: np.ndarray, qmax: int, itype: type[np.integer]) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric codes for a 2-D array; returns (codes, scale[rows])."""
    amax = np.abs(x2).max(axis=1) if x2.shape[1] else np.zeros(x2.shape[0], dtype=np.float32)
    scale = _roomy_scales((amax / np.float32(qmax)).astype(np.float32), amax, qmax)
    safe = np.where(scale > 0, scale, np.float32(1)).astype(np.float64)
    # float64 division: the code nearest to x for the float32 scale actually stored
    codes = np.clip(np.round(x2.astype(np.float64) / safe[:, None]), -qmax, qmax)
    return codes.astype(itype), scale


def quantize_array(name: str, x: np.ndarray, bits: int, gran: Granularity) -> Tensor:
    """One float32 array as an integer Tensor under `gran` (1-D arrays are one row)."""
    itype, qmax = _int_type(bits)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if gran.scheme == "tensor":
        codes, t_scale, t_offset = quantize_tensor_minmax(x, bits)
        if not (np.isfinite(t_scale) and np.isfinite(t_offset)):
            span = float(x.max()) - float(x.min())
            raise CrystalError(f"{name}: its values span {span:.3g}, past float32's range, which one per-tensor "
                               f"scale and offset cannot cover: quantize it per row or in groups")
        q = Quant("tensor", np.array([t_scale], dtype=np.float32), np.array([t_offset], dtype=np.float32))
        return Tensor(name, codes, q)
    if x.ndim == 1 or gran.scheme == "row":
        x2 = x.reshape(1, -1) if x.ndim == 1 else x
        codes, scale = _symmetric(x2, qmax, itype)
        q = Quant("row", scale, np.zeros_like(scale))
        return Tensor(name, codes.reshape(x.shape), q)
    rows, cols = x.shape
    g = min(gran.group, cols)  # a group wider than the row is the row: pad to no more than its width
    n_groups = -(-cols // g)
    padded = np.zeros((rows, n_groups * g), dtype=np.float32)  # zero padding never raises a group's max
    padded[:, :cols] = x
    codes, scale = _symmetric(padded.reshape(rows * n_groups, g), qmax, itype)
    codes = codes.reshape(rows, n_groups * g)[:, :cols]
    scale = scale.reshape(rows, n_groups)
    q = Quant("group", scale, np.zeros_like(scale), group=gran.group)
    return Tensor(name, np.ascontiguousarray(codes), q)


def _quantize_tensor(t: Tensor, bits: int, gran: Granularity, keep_float: tuple[str, ...],
                     grams: dict[str, np.ndarray]) -> Tensor:
    if t.dtype == "bool":
        return t
    if t.name in keep_float:
        return t if t.quant is None else Tensor(t.name, t.values())
    x = t.values()
    q = quantize_array(t.name, x, bits, gran)
    if t.name in grams:
        q = calibrated_tensor(q, x, grams[t.name], _int_type(bits)[1])
    return q


def quantize(graph: Graph, mode: str, granularity: str | Granularity = "tensor",
             calibration: np.ndarray | None = None) -> Graph:
    """A verified copy of `graph` with its weights quantized by `mode` at `granularity`.

    `calibration` (current ids [B, S], e.g. from calibrate.calibration_windows on training
    text): the linear layers' codes are chosen by calibrated rounding (crystalc.passes.calibrate)
    instead of nearest rounding; the scales and offsets are the same either way.
    """
    check_mode(mode)
    gran = granularity if isinstance(granularity, Granularity) else parse_granularity(granularity)
    bits = _BITS[mode]
    keep = _FLOAT_KEPT_IN_MIXED if mode.startswith("mixed") else ()
    meta = dict(graph.meta)
    meta["quantize"] = {"mode": mode, "granularity": str(gran)}
    grams: dict[str, np.ndarray] = {}
    if calibration is not None:
        grams = input_grams(graph, calibration)
        meta["quantize"]["rounding"] = f"calibrated on {int(np.asarray(calibration).size)} tokens"
    return graph.map_tensors(lambda t: _quantize_tensor(t, bits, gran, keep, grams)).replace(meta=meta).verify()
