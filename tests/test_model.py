"""NeuronField's hand-written backward against autograd, and its forward against the spec's formula."""

from __future__ import annotations

import errno

import pytest
import torch

from crystalc.config import ModelConfig
from crystalc.errors import CrystalError
from crystalc.model import CrystalLM, NeuronField, _FieldFunction, save_checkpoint


def reference(h, pos, val, tau, normalize, eps, frozen):
    """Autograd through the spec's formula, frozen rows detached."""
    m = frozen.view(-1, 1)
    pos = torch.where(m, pos.detach(), pos)
    val = torch.where(m, val.detach(), val)
    tau = torch.where(frozen, tau.detach(), tau)
    diff = h.unsqueeze(-2) - pos
    w = torch.exp(-torch.sqrt((diff * diff).sum(-1)) / (tau.abs() + 0.1))
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + eps)
    return w @ val


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("frozen_frac", [0.0, 0.4, 1.0])
def test_backward_matches_autograd(normalize: bool, fast: bool, frozen_frac: float) -> None:
    """float64, so 1e-10 is rounding; frozen rows' gradients are exactly zero."""
    g = torch.Generator().manual_seed(0)
    n = 70  # more than one distance chunk
    h = torch.randn(2, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    pos = torch.randn(n, 6, dtype=torch.float64, generator=g, requires_grad=True)
    val = torch.randn(n, 6, dtype=torch.float64, generator=g, requires_grad=True)
    tau = torch.randn(n, dtype=torch.float64, generator=g, requires_grad=True)
    frozen = torch.arange(n) < int(frozen_frac * n)
    out = _FieldFunction.apply(h, pos, val, tau, ~frozen, normalize, 1e-8, fast)
    ref = reference(h, pos, val, tau, normalize, 1e-8, frozen)
    assert (out - ref).abs().max() < 1e-10
    gout = torch.randn(out.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(out, (h, pos, val, tau), gout)
    want = torch.autograd.grad(ref, (h, pos, val, tau), gout)
    for a, b in zip(got, want, strict=True):
        assert (a - b).abs().max() < 1e-10
    for a in got[1:]:
        assert torch.count_nonzero(a[frozen]) == 0


def test_forward_is_the_spec_formula_bit_for_bit() -> None:
    """Training (custom function, exact distances) and inference give the spec formula's exact bits."""
    torch.manual_seed(0)
    f = NeuronField(150, 24)
    f.frozen[:50] = True
    h = torch.randn(3, 7, 24)
    ref = reference(h, f.positions, f.values, f.temperature, True, f.eps, f.frozen).detach()
    with torch.no_grad():
        assert torch.equal(f(h), ref)
    assert torch.equal(f(h.requires_grad_()).detach(), ref)
    f.fast_distance = True  # the trainer's switch: close, not bit-identical
    assert (f(h).detach() - ref).abs().max() < 1e-5


def test_a_full_disk_while_saving_is_one_error(tmp_path, monkeypatch) -> None:
    # an audit: torch's zip writer turns the file's OSError into a RuntimeError ("unexpected pos 74304 vs 74256"),
    # and `train` ended its run in a traceback
    def full_disk(obj, f) -> None:
        f.write(b"PK")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 74304 vs 74256") from None

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CrystalError, match=r"m\.pt: writing the checkpoint failed \(No space left on device\); "
                                           r"nothing written$"):
        save_checkpoint(str(tmp_path / "m.pt"), CrystalLM(ModelConfig(vocab_size=5, d_model=4, n_heads=1)))
    assert not list(tmp_path.iterdir())
