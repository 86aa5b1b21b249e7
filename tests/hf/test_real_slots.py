"""Padded batch forwards whose linear layers compute the real slots only (``ouroboros.hf.real_slots``): the same
logits as the padded forward in every tested family (over several forwards, so the pads' cache entries are covered),
matrix products over the real rows only, and the module's own forward outside the block."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, make_model
from torch import nn
from torch.overrides import TorchFunctionMode

from ouroboros.core.tokentree import TokenTree
from ouroboros.hf import real_slots
from ouroboros.hf.batch_model import BatchModel
from ouroboros.hf.quantize import quantize_draft


class _MatmulRows(TorchFunctionMode):
    """Records the rows of every linear product (``F.linear`` input rows, or the small-M ``mm(W, x.T)`` columns)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear:
            self.rows.append(args[0].numel() // args[0].shape[-1])
        elif func is torch.mm:
            self.rows.append(args[1].shape[1])
        return func(*args, **(kwargs or {}))


def _tree(tokens: list[int], branch: list[int] | None = None) -> TokenTree:
    """A chain of ``tokens`` (the path kept after the forward: its first ``len(tokens)`` entries), plus a branch off
    its first token."""
    tree = TokenTree()
    tree.add_path(-1, tokens)
    if branch:
        tree.add_path(0, branch)
    return tree


def _run(model, monkeypatch, on: bool) -> list[dict[int, torch.Tensor]]:
    """Three forwards of a 3-row batch with trees of different sizes (pads in every forward), keeping a path of each."""
    monkeypatch.setenv("OUROBOROS_REAL_SLOTS", "1" if on else "0")
    batch = BatchModel(model, 3)
    steps = [{0: ([5, 6, 7, 8, 9], None), 1: ([3], None), 2: ([4, 4, 2], [11])},
             {0: ([12], None), 1: ([13, 14, 15, 16], [17, 18]), 2: ([19, 20], None)},
             {0: ([21, 22, 23], None), 2: ([24], None)}]              # row 1 idle: pads only
    out = []
    with torch.inference_mode():
        for step in steps:
            logits = batch.forward({row: _tree(*paths) for row, paths in step.items()})
            out.append({r: v.float().clone() for r, v in logits.items()})
            for row, (chain, _) in step.items():
                batch.keep(row, batch.length[row], list(range(len(chain))))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_slot_forwards_equal_the_padded_forwards(family, monkeypatch):
    model = make_model(family)
    padded, real = _run(model, monkeypatch, on=False), _run(model, monkeypatch, on=True)
    for a, b in zip(padded, real, strict=True):
        assert a.keys() == b.keys()
        for row in a:
            torch.testing.assert_close(b[row], a[row], atol=1e-5, rtol=1e-5)


def test_linear_products_run_over_the_real_rows_only(monkeypatch):
    model = make_model("qwen2")
    monkeypatch.setenv("OUROBOROS_REAL_SLOTS", "1")
    batch = BatchModel(model, 3)
    with torch.inference_mode(), _MatmulRows() as seen:
        batch.forward({0: _tree([5, 6, 7, 8, 9]), 1: _tree([3]), 2: _tree([4, 4, 2])})
    assert seen.rows and set(seen.rows) == {9}          # 5 + 1 + 3 real slots of 3 x 5


def test_an_int8_model_stays_close_and_keeps_its_argmax(monkeypatch):
    torch.manual_seed(0)
    model = quantize_draft(make_model("llama"), "int8")
    padded, real = _run(model, monkeypatch, on=False), _run(model, monkeypatch, on=True)
    for a, b in zip(padded, real, strict=True):
        for row in a:
            assert (b[row] - a[row]).abs().max() < 0.05 * a[row].abs().max()


def test_outside_the_block_and_for_other_shapes_the_module_is_unchanged():
    torch.manual_seed(0)
    lin = nn.Linear(8, 6)
    model = nn.Sequential(lin)
    x = torch.randn(2, 4, 8)
    real_slots.install(model)
    real_slots.install(model)                                  # idempotent
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))
    with real_slots.real_slots(model, [3, 1], 4, torch.device("cpu")):
        y = lin(x)
        other = lin(torch.randn(5, 8))                          # not 2 x 4 rows: computed as is
    assert other.shape == (5, 6)
    torch.testing.assert_close(y[0, :3], F.linear(x[0, :3], lin.weight, lin.bias))
    torch.testing.assert_close(y[1, :1], F.linear(x[1, :1], lin.weight, lin.bias))
    assert not y[0, 3:].any() and not y[1, 1:].any()            # pads: zero
    real_slots.uninstall(model)
    installed = getattr(lin.__dict__.get("forward"), "func", None)
    assert getattr(installed, "__module__", None) != "ouroboros.hf.real_slots"
