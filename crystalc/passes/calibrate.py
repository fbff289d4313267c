"""Calibrated rounding for the quantize pass: codes that keep each linear layer's output close.

Rounding every weight to its nearest code minimises each weight's own error, but a
layer's output error is what the model feels. Given the Gram matrix G = X^T X of the
layer's inputs on some calibration text, the rounding of a weight matrix W [out, in]
can trade errors between columns: quantize column j, then spread its error over the
columns not yet quantized, weighted by the inverse of G (the GPTQ method: Frantar et
al., 2022). The scales and offsets stay exactly those of the chosen scheme (per-row
symmetric, per-group, or per-tensor min/max); only which integer each weight gets
changes, so the file format, the dequantization and every backend are untouched.
The cost: a code may now lie more than half a step from its weight (it is still
clipped to +-qmax), and the result depends on the calibration text.

Linear layers here: the q/k/v/out projections, fc1, fc2 and an untied head. The
embeddings are lookups, the field measures distances, and 1-D tensors have no
input dimension to trade along: those keep nearest rounding. The Gram matrices are
taken from the float32 model (not layer by layer from the partly quantized one).
"""

from __future__ import annotations

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir import interpret
from crystalc.ir.graph import Graph
from crystalc.ir.tensor import Quant, Tensor
from crystalc.tokenizer import Tokenizer

DAMP = 0.01  # added to G's diagonal, as a share of its mean: keeps G invertible (GPTQ's default)


def calibration_windows(graph: Graph, text: str, max_tokens: int = 16384) -> np.ndarray:
    """Current ids [B, n_ctx] of `text` (tokens a pruned vocabulary lacks are skipped)."""
    if graph.tokenizer is None:
        raise CrystalError("calibration needs a model with a tokenizer")
    tokenizer = Tokenizer(graph.tokenizer, graph.original_vocab_size)
    # the first max_tokens tokens, counted before a pruned vocabulary's missing ones are skipped, as
    # eval --max-tokens counts them
    tokens = tokenizer.encode(text, strict=False)
    ids, _ = graph.known_rows(tokens[:max_tokens])
    t = graph.config.n_ctx
    if ids.size < t:
        where = ("the calibration text holds" if len(tokens) <= max_tokens
                 else f"the first {max_tokens:,} tokens of the calibration text (--calibrate-tokens) hold")
        known = "1 token" if ids.size == 1 else f"{ids.size:,} tokens"
        raise CrystalError(f"{where} {known} this model knows, fewer than one window of {t}")
    return ids[: ids.size // t * t].reshape(-1, t)


def input_grams(graph: Graph, windows: np.ndarray) -> dict[str, np.ndarray]:
    """Name of each linear layer's weight -> X^T X (float64) of its inputs over every window."""
    c = graph.config
    grams: dict[str, np.ndarray] = {}

    def add(name: str, x: np.ndarray) -> None:
        x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)
        grams[name] = grams.get(name, 0) + x64.T @ x64

    windows = np.asarray(windows, dtype=np.int64)
    b, s = windows.shape
    # each layer's inputs over a batch of windows (attention's window by window) make one gram
    per_batch = interpret.windows_per_batch(c, s)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow leaves a gram not finite: refused below
        for first in range(0, b, per_batch):
            seen: dict[str, list[np.ndarray]] = {}

            def record(weight: Tensor, x: np.ndarray, seen: dict[str, list[np.ndarray]] = seen) -> None:
                seen.setdefault(weight.name, []).append(x)

            interpret.forward_batch(graph, windows[first:first + per_batch], tap=record)
            for name, parts in seen.items():
                add(name, np.concatenate(parts))
    grams.pop(graph.token_embed.weight.name, None)  # a tied head is the embedding table: nearest rounding
    for name, g in grams.items():
        if not np.isfinite(g).all():
            raise CrystalError(f"calibration: the inputs of {name} are not finite on the calibration text "
                               "(the float32 model overflows)")
    return grams


def round_calibrated(w: np.ndarray, quant: Quant, gram: np.ndarray, qmax: int) -> np.ndarray:
    """Codes for W [out, in] under `quant`'s scales and offsets, column by column with error feedback."""
    rows, cols = w.shape
    scale, offset = (a.astype(np.float64) for a in quant.expanded(w.shape))
    g = np.array(gram, dtype=np.float64)
    dead = np.diag(g) == 0  # an input that is always 0: its weights do not matter
    g[dead, dead] = 1.0
    g[np.diag_indices(cols)] += DAMP * float(np.mean(np.diag(g)))
    # the upper Cholesky factor of G^-1: row j holds how column j's error moves the later columns
    u = np.linalg.cholesky(np.linalg.inv(g)).T
    work = w.astype(np.float64).copy()
    codes = np.zeros((rows, cols), dtype=np.float64)
    for j in range(cols):
        s, o = scale[:, j], offset[:, j]
        safe = np.where(s > 0, s, 1.0)
        cj = np.where(s > 0, np.clip(np.round((work[:, j] - o) / safe), -qmax, qmax), 0.0)
        codes[:, j] = cj
        err = (work[:, j] - (cj * s + o)) / u[j, j]
        work[:, j + 1:] -= np.outer(err, u[j, j + 1:])
    return codes


def calibrated_tensor(t: Tensor, x: np.ndarray, gram: np.ndarray, qmax: int) -> Tensor:
    """`t` (quantized with nearest rounding from the float32 values x) with its codes re-chosen."""
    if t.quant is None:
        raise ValueError(f"{t.name}: calibrated rounding re-chooses the codes of a quantized tensor")
    with np.errstate(over="ignore", invalid="ignore"):
        codes = round_calibrated(x, t.quant, gram, qmax)
    if not np.isfinite(codes).all():
        raise CrystalError(f"calibration: {t.name}'s calibrated codes are not finite (its inputs' scale "
                           "overflows the error feedback)")
    return Tensor(t.name, codes.astype(t.data.dtype), t.quant)
