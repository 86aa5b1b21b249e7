"""ouroboros.cpu_linear: the small-M CPU linear equals F.linear (to fp32 rounding) and is scoped to its block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ouroboros.cpu_linear import SMALL_M_MAX, small_m_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, SMALL_M_MAX, SMALL_M_MAX + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen)
    b = torch.randn(80, generator=gen) if bias else None
    want = F.linear(x, w, b)
    layer = torch.nn.Linear(48, 80, bias=bias).eval()
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(b)
    with torch.inference_mode(), small_m_linear():
        out = layer(x)
    assert out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_scoped_and_off_switch(monkeypatch):
    original = F.linear
    with torch.no_grad(), small_m_linear():
        assert F.linear is not original
        with small_m_linear():                      # nested: still the same, restored once at the outer exit
            pass
        assert F.linear is not original
    assert F.linear is original
    with small_m_linear(enabled=False):
        assert F.linear is original
    monkeypatch.setenv("OUROBOROS_SMALL_M_LINEAR", "0")
    with small_m_linear():
        assert F.linear is original


def test_grad_and_other_dtypes_fall_through():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    with small_m_linear():
        y = F.linear(x, w)                           # grad enabled: the original op, autograd intact
        y.sum().backward()
        assert x.grad is not None
        xd, wd = x.detach().double(), w.detach().double()
        with torch.no_grad():
            torch.testing.assert_close(F.linear(xd, wd), xd @ wd.t())
