"""`crystalc inspect --plot`: the neuron field of each block in 2-D, and the training curve.

The field is projected onto its first two principal components (numpy SVD, per
block). Frozen (crystallised) and active neurons are drawn apart; a point's size
follows the norm of its value vector, so the neurons that write most stand out.
matplotlib is an optional extra and is imported only here.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from crystalc.errors import CrystalError
from crystalc.ir.graph import Graph

FROZEN, ACTIVE = "#3b6ea8", "#e3812b"


def pca2(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of x projected on their first two principal components, and the variance share of each."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0:
        return np.zeros((0, 2)), np.zeros(2)
    c = x - x.mean(0)
    _, s, vt = np.linalg.svd(c, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((len(x), 2))
    proj[:, :k] = c @ vt[:k].T
    var = s ** 2
    share = np.zeros(2)
    share[:k] = var[:k] / var.sum() if var.sum() > 0 else 0
    # Fix the sign of each axis (largest |coordinate| positive) so the picture is reproducible.
    for j in range(k):
        i = int(np.argmax(np.abs(proj[:, j])))
        if proj[i, j] < 0:
            proj[:, j] *= -1
    return proj, share


# what --plot writes, by the output's suffix; the metadata keys that would put the date or the matplotlib
# version into the file are left out, so that the same model draws the same bytes
FORMATS = {".png": ("png", {"Software": None}), ".svg": ("svg", {"Date": None, "Creator": None})}


def plot_format(out: str | Path) -> str:
    """The format `out`'s suffix asks for (no suffix: PNG); any other suffix is an error, not a PNG under it."""
    suffix = Path(out).suffix.lower()
    if suffix and suffix not in FORMATS:
        raise CrystalError(f"--plot writes {' or '.join(FORMATS)} files, not {suffix}: name the output so")
    return suffix or ".png"


def plot_model(graph: Graph, out: str | Path, title: str | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CrystalError("--plot needs matplotlib (pip install 'crystalc[plot]')") from None
    from crystalc.fsutil import atomic_file

    fmt, metadata = FORMATS[plot_format(out)]
    matplotlib.rcParams["svg.hashsalt"] = "crystalc"  # SVG element ids from a fixed salt, not a random one
    blocks = list(graph.blocks)
    curve = _checked_curve(graph.meta.get("curve") or [])
    ncols = max(len(blocks), 2 if curve else 1)
    nrows = 2 if curve else 1
    fig = plt.figure(figsize=(4.6 * ncols, 4.2 * nrows), dpi=110)
    gs = fig.add_gridspec(nrows, ncols)
    for b, blk in enumerate(blocks):
        ax = fig.add_subplot(gs[0, b])
        _field(ax, blk.field, b)
    if len(blocks) < ncols:  # a spare panel: the neurons' length scales
        _scales(fig.add_subplot(gs[0, len(blocks):]), blocks)
    if curve:
        half = ncols // 2
        _loss(fig.add_subplot(gs[1, :half]), curve)
        _neurons(fig.add_subplot(gs[1, half:]), curve)
    fig.suptitle(title or _title(graph), fontsize=11)
    fig.tight_layout()
    with atomic_file(str(out)) as f:
        fig.savefig(f, format=fmt, metadata=metadata)
    plt.close(fig)


def _checked_curve(curve: Any) -> list[dict[str, Any]]:
    """The training curve from the model's metadata, checked: it comes from the file, not from crystalc."""
    def number(x: Any) -> bool:  # NaN plots as a gap; a huge number cannot be placed on an axis at all
        return isinstance(x, (int, float)) and not isinstance(x, bool) and (x != x or abs(x) <= 1e15)

    def counts(x: Any) -> bool:
        return isinstance(x, list) and all(number(n) for n in x)

    def loss(x: Any) -> bool:  # a .crystal file keeps a NaN loss as null (JSON has no NaN)
        return x is None or number(x)

    ok = isinstance(curve, list) and all(
        isinstance(p, dict) and all(number(p.get(k)) for k in ("step", "frozen_pct"))
        and all(loss(p.get(k, 0.0)) for k in ("loss", "val_loss")) and "loss" in p and "val_loss" in p
        and counts(p.get("neurons")) and counts(p.get("frozen", [])) for p in curve)
    if not ok:
        raise CrystalError("meta: 'curve' is not a list of training records (step, loss, val_loss, neurons, "
                           "frozen, frozen_pct) of numbers within +-1e15: cannot plot it")
    return curve


def _title(graph: Graph) -> str:
    c = graph.config
    n = sum(b.field.n_neurons for b in graph.blocks)
    fz = sum(int(np.asarray(b.field.frozen.data).sum()) for b in graph.blocks)
    return (f"crystal model: V {c.vocab_size}, D {c.d_model}, T {c.n_ctx}, {c.n_blocks} block(s), "
            f"{n} neurons ({fz} frozen)")


def _field(ax: Any, field: Any, b: int) -> None:
    pos, val = field.positions.values(), field.values.values()  # a quantized model's values, not its codes
    frozen = np.asarray(field.frozen.data, dtype=bool)
    xy, share = pca2(pos)
    size = np.linalg.norm(np.asarray(val, dtype=np.float64), axis=1) if len(val) else np.zeros(0)
    size = 8 + 60 * size / size.max() if len(size) and size.max() > 0 else np.full(len(xy), 12.0)
    for mask, color, label in ((frozen, FROZEN, "frozen"), (~frozen, ACTIVE, "active")):
        if mask.any():
            ax.scatter(xy[mask, 0], xy[mask, 1], s=size[mask], c=color, alpha=0.7, edgecolors="none",
                       label=f"{label} ({int(mask.sum())})")
    ax.set_title(f"block {b}: neuron field (PCA of positions)", fontsize=10)
    ax.set_xlabel(f"PC1 ({share[0]:.0%} of variance)", fontsize=9)
    ax.set_ylabel(f"PC2 ({share[1]:.0%} of variance)", fontsize=9)
    if len(xy):
        ax.legend(fontsize=8, loc="best", markerscale=1.0)
    else:
        ax.text(0.5, 0.5, "no neurons", ha="center", va="center", transform=ax.transAxes)
    ax.grid(alpha=0.25)


def _scales(ax: Any, blocks: list[Any]) -> None:
    """Histogram of each neuron's length scale |tau| + 0.1 (the distance at which its weight falls by e)."""
    groups: dict[str, list[np.ndarray]] = {"frozen": [], "active": []}
    for blk in blocks:
        t = blk.field.temperature
        tau = np.abs(np.asarray(t.values(), dtype=np.float64)) + 0.1
        fz = np.asarray(blk.field.frozen.data, dtype=bool)
        groups["frozen"].append(tau[fz])
        groups["active"].append(tau[~fz])
    data = {k: np.concatenate(v) if v else np.zeros(0) for k, v in groups.items()}
    allv = np.concatenate(list(data.values()))
    if len(allv):
        bins = np.linspace(allv.min(), allv.max() + 1e-9, 30)
        for (k, v), color in zip(data.items(), (FROZEN, ACTIVE), strict=True):
            if len(v):
                ax.hist(v, bins=bins, color=color, alpha=0.65, label=f"{k} ({len(v)})")
        ax.legend(fontsize=8)
    ax.set_title("length scale |temperature| + 0.1", fontsize=10)
    ax.set_xlabel("distance scale")
    ax.set_ylabel("neurons")
    ax.grid(alpha=0.25)


def _loss(ax: Any, curve: list[dict[str, Any]]) -> None:
    steps = [p["step"] for p in curve]

    def values(key: str) -> list[float]:
        return [math.nan if p[key] is None else p[key] for p in curve]

    ax.plot(steps, values("loss"), color="#888888", lw=1.2, label="train loss (last batch)")
    ax.plot(steps, values("val_loss"), color="#c0392b", lw=1.8, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("training curve", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.25)


def _neurons(ax: Any, curve: list[dict[str, Any]]) -> None:
    steps = [p["step"] for p in curve]
    ax.plot(steps, [sum(p["neurons"]) for p in curve], color=ACTIVE, lw=1.8, label="neurons")
    ax.plot(steps, [sum(p.get("frozen", [0])) for p in curve], color=FROZEN, lw=1.8, label="frozen neurons")
    ax.set_xlabel("step")
    ax.set_ylabel("neurons (all blocks)")
    ax2 = ax.twinx()
    ax2.plot(steps, [p["frozen_pct"] for p in curve], color=FROZEN, lw=1, ls="--", label="frozen %")
    ax2.set_ylabel("frozen %")
    ax2.set_ylim(0, 100)
    lines = ax.get_lines() + ax2.get_lines()
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="upper left")
    ax.set_title("growth and crystallisation", fontsize=10)
    ax.grid(alpha=0.25)
