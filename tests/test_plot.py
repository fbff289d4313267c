"""crystalc inspect --plot: a PNG of the neuron field and, when the checkpoint has one, the training curve."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import random_graph, require_module, save_pt

PNG = b"\x89PNG\r\n\x1a\n"


def _crystalc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "crystalc.cli", *args], capture_output=True, text=True, timeout=120)


def test_pca2_orders_by_variance() -> None:
    from crystalc.plot import pca2

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 3)) * [5.0, 1.0, 0.1]
    xy, share = pca2(x)
    assert xy.shape == (200, 2) and share[0] > share[1] > 0
    assert np.corrcoef(xy[:, 0], x[:, 0])[0, 1] ** 2 > 0.99
    assert pca2(np.zeros((0, 3)))[0].shape == (0, 2)


@pytest.mark.parametrize("shape", ["three_blocks_n0_n1", "d40_h5"])
def test_inspect_plot(tmp_path: Path, shape: str) -> None:
    require_module("matplotlib")
    g = random_graph(shape, seed=1)
    g = g.replace(meta={"curve": [
        {"step": s, "round": s, "loss": 3 - s / 10, "val_loss": 3.1 - s / 11, "neurons": [4 + s] * g.config.n_blocks,
         "frozen": [s // 2] * g.config.n_blocks, "frozen_pct": 10.0 * s / 5} for s in range(1, 6)]})
    from crystalc.plot import plot_model

    png = tmp_path / "a.png"
    plot_model(g, png)
    assert png.read_bytes().startswith(PNG)
    plot_model(g, tmp_path / "b.png")
    assert (tmp_path / "b.png").read_bytes() == png.read_bytes()  # deterministic


_RECORD = {"step": 1, "loss": 2.0, "val_loss": 2.0, "neurons": [4], "frozen": [0], "frozen_pct": 0.0}


@pytest.mark.parametrize("curve", [5, "abc", [1, 2], [{"step": "x"}], [{**_RECORD, "neurons": 4}],
                                   [{**_RECORD, "step": 10**400}], [{**_RECORD, "neurons": [10**400]}],
                                   [_RECORD, {**_RECORD, "step": 1e308}]])  # numbers no axis can place
def test_a_malformed_curve_is_a_crystal_error(tmp_path: Path, curve) -> None:
    """The curve comes from the checkpoint's metadata, so a damaged one is bad input, not a crash."""
    require_module("matplotlib")
    from crystalc.errors import CrystalError
    from crystalc.plot import plot_model

    g = random_graph("d40_h5", seed=1).replace(meta={"curve": curve})
    with pytest.raises(CrystalError, match="'curve' is not a list of training records"):
        plot_model(g, tmp_path / "a.png")
    assert not list(tmp_path.iterdir())


def test_inspect_plot_cli(tmp_path: Path) -> None:
    require_module("matplotlib")
    model = save_pt(random_graph("d40_h5", seed=2), tmp_path / "m.pt")
    out = tmp_path / "field.png"
    r = _crystalc("inspect", str(model), "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().startswith(PNG) and f"wrote {out}" in r.stdout
    svg = tmp_path / "field.svg"
    drawn = []
    for _ in range(2):  # the same bytes each time: no date, no random element ids
        assert _crystalc("inspect", str(model), "--plot", str(svg)).returncode == 0
        drawn.append(svg.read_bytes())
    assert drawn[0].startswith(b"<?xml") and b"<svg" in drawn[0] and drawn[1] == drawn[0]
    r = _crystalc("inspect", str(model), "--plot", str(tmp_path / "field.jpg"))
    assert r.returncode == 2 and r.stderr == "crystalc: error: --plot writes .png or .svg files, not .jpg: name the " \
                                             "output so\n" and not (tmp_path / "field.jpg").exists()


def test_plot_of_a_crystal_file_does_not_import_torch(tmp_path: Path) -> None:
    require_module("matplotlib")
    from crystalc.format.crystal import write_crystal

    path = tmp_path / "m.crystal"
    write_crystal(random_graph("tied_unnormalised", seed=3), str(path))
    code = ("import sys; from crystalc.frontend import load_model; from crystalc.plot import plot_model; "
            f"plot_model(load_model({str(path)!r}), {str(tmp_path / 'm.png')!r}); "
            "sys.exit(3 if 'torch' in sys.modules else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.png").read_bytes().startswith(PNG)


def test_a_quantized_field_is_plotted_by_its_values(tmp_path: Path, monkeypatch) -> None:
    # the positions' PCA and the scales' histogram read the values, not the int8 codes
    require_module("matplotlib")
    from matplotlib.axes import Axes

    import crystalc.plot as plot
    from crystalc.passes.quantize import quantize

    g = random_graph("d40_h5", seed=1).replace(meta={"curve": [_RECORD]})  # a curve: a spare panel for the scales
    seen: list[np.ndarray] = []
    real_pca2 = plot.pca2
    monkeypatch.setattr(plot, "pca2", lambda x: seen.append(np.asarray(x)) or real_pca2(x))
    hists: list[np.ndarray] = []
    real_hist = Axes.hist
    monkeypatch.setattr(Axes, "hist",
                        lambda self, x, *a, **k: hists.append(np.asarray(x)) or real_hist(self, x, *a, **k))
    plot.plot_model(quantize(g, "int8", "row"), tmp_path / "q.png")
    want = g.blocks[0].field.positions.values()
    assert len(seen) == 1 and np.abs(seen[0] - want).max() <= np.abs(want).max() / 127
    # the frozen and active neurons' length scales |tau| + 0.1, from the temperatures' values
    field = g.blocks[0].field
    frozen = np.asarray(field.frozen.data, dtype=bool)
    tau = np.abs(field.temperature.values().astype(np.float64)) + 0.1
    got = np.concatenate(hists)
    want_tau = np.concatenate([tau[frozen], tau[~frozen]])
    assert got.shape == want_tau.shape and np.abs(got - want_tau).max() <= (tau.max() - 0.1) / 127
