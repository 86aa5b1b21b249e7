"""ouroboros.hf.cpu_linear: the small-M CPU linear equals F.linear (to fp32 rounding), applies only to the Linear modules
of the model it is given, only inside its block and only in the calling thread; F.linear itself is never swapped."""
from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from ouroboros.hf import cpu_linear
from ouroboros.hf.cpu_linear import (
    SMALL_M_MAX,
    install,
    linear,
    small_m_linear,
    uninstall,
)


def _layer(w: torch.Tensor, b: torch.Tensor | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None).eval()
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return layer


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 16, SMALL_M_MAX, SMALL_M_MAX + 1])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 48, generator=gen)
    w = torch.randn(80, 48, generator=gen)
    b = torch.randn(80, generator=gen) if bias else None
    want = F.linear(x, w, b)
    layer = _layer(w, b)
    with torch.inference_mode(), small_m_linear(layer):
        out = layer(x)
    assert out.shape == want.shape and out.is_contiguous()
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def _spy(monkeypatch) -> list:
    """Record the thread of every call of the small-M linear made by an installed forward."""
    calls = []

    def spy(*args):
        calls.append(threading.get_ident())
        return linear(*args)

    monkeypatch.setattr(cpu_linear, "linear", spy)
    return calls


def test_scoped_to_block_model_and_switch(monkeypatch):
    original = F.linear
    calls = _spy(monkeypatch)
    ours, other = torch.nn.Sequential(torch.nn.Linear(8, 6)), torch.nn.Linear(8, 6)
    x = torch.randn(4, 8)
    with torch.no_grad():
        with small_m_linear(ours):
            assert F.linear is original                 # nothing process-wide
            ours(x)
            other(x)                                    # not a module of the model given: plain F.linear
            with small_m_linear(ours):                  # nests
                ours(x)
            ours(x)
        assert len(calls) == 3
        ours(x)                                         # outside the block: plain nn.Linear.forward
        assert len(calls) == 3
        with small_m_linear(ours, enabled=False):
            ours(x)
        monkeypatch.setenv("OUROBOROS_SMALL_M_LINEAR", "0")
        with small_m_linear(ours):
            ours(x)
    assert len(calls) == 3


def test_install_is_per_instance_and_reversible():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    install(model)
    assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
    assert "forward" not in torch.nn.Linear(4, 4).__dict__
    twin = copy.deepcopy(model)                           # the copy's forwards point at the copy's own modules
    assert twin[0].forward.args[0] is twin[0]
    uninstall(model)
    assert not any("forward" in m.__dict__ for m in model)


def test_other_threads_run_plain_linear(monkeypatch):
    calls = _spy(monkeypatch)
    layer = torch.nn.Linear(8, 6)
    x = torch.randn(4, 8)
    seen = {}

    def other_thread():
        with torch.no_grad():
            seen["out"] = layer(x)

    with torch.no_grad(), small_m_linear(layer):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert calls == []                              # the other thread did not take our path ...
        layer(x)
    assert calls == [threading.get_ident()]             # ... this one did
    assert torch.equal(seen["out"], F.linear(x, layer.weight, layer.bias))


def test_quantized_and_subclassed_linears_are_left_alone():
    class MyLinear(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyLinear(4, 4), torch.nn.Linear(4, 4))
    install(model)
    assert "forward" not in model[0].__dict__ and "forward" in model[1].__dict__
    if "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines:
        from ouroboros.hf.quantize import quantize_draft
        q = quantize_draft(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        install(q)
        assert not any("forward" in m.__dict__ for m in q.modules())


def test_grad_and_other_dtypes_fall_through():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    y = linear(x, w)                                     # grad enabled: the original op, autograd intact
    y.sum().backward()
    assert x.grad is not None
    xd, wd = x.detach().double(), w.detach().double()
    with torch.no_grad():
        torch.testing.assert_close(linear(xd, wd), xd @ wd.t())
