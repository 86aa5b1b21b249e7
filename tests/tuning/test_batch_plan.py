"""The batch plan (``ouroboros.tuning.batch_plan``): the draft length per (device, B) from measured costs, plain
decoding where speculation cannot pay, and the engine following it (stats say which and why)."""
from __future__ import annotations

import ouroboros
import pytest
import torch
from conftest import hf_greedy, make_model, noisy_copy, random_prompt, repetitive_prompt
from ouroboros.core.config import CPU_DEFAULTS
from ouroboros.tuning import batch_plan as bp
from ouroboros.tuning.recorded import ACCEPTANCE, H200_UNFUSED

MODELS = list(ACCEPTANCE.values())
TOKENS = (1, 2, 4, 8, 16, 32)


def costs(per_token: float, draft_ratio: float = 0.1, sizes=(1, 2, 4, 8)) -> bp.BatchCosts:
    """ms = 100 * (1 + per_token * (B * T - 1)): per_token 0 is free width, 1 makes every token cost a forward."""
    def table(scale):
        return {b: {t: scale * 100 * (1 + per_token * (b * t - 1)) for t in TOKENS} for b in sizes}
    return bp.BatchCosts(table(1.0), table(draft_ratio), "synthetic")


def test_free_width_speculates_and_costly_width_does_not():
    free = bp.plan_batch(4, CPU_DEFAULTS, costs(0.0), MODELS)
    assert free.speculate and free.config.adaptive is False and free.predicted_speedup > 2
    assert free.config.gamma == max(c["gamma"] for c in free.candidates)         # width is free: the longest
    dear = bp.plan_batch(4, CPU_DEFAULTS, costs(1.0), MODELS)
    assert not dear.speculate and dear.config is None and dear.predicted_speedup < 1.05
    assert "cannot pay at B=4" in dear.reason and "draft forwards" in dear.reason
    assert dear.as_dict()["speculate"] is False and len(dear.as_dict()["candidates"]) == 6


def test_larger_batches_draft_shorter_or_not_at_all():
    """Costs that grow with the batch's tokens: the chosen draft length never grows with B."""
    c = costs(0.15)
    gammas = [(p.config.gamma if p.speculate else 0) for p in (bp.plan_batch(b, CPU_DEFAULTS, c, MODELS)
                                                               for b in (1, 2, 4, 8))]
    assert gammas == sorted(gammas, reverse=True) and gammas[0] > gammas[-1]


def test_plans_are_deterministic_and_bad_input_is_refused():
    c = costs(0.1)
    assert bp.plan_batch(3, CPU_DEFAULTS, c, MODELS) == bp.plan_batch(3, CPU_DEFAULTS, c, MODELS)
    with pytest.raises(ValueError, match="rows >= 1"):
        bp.plan_batch(0, CPU_DEFAULTS, c, MODELS)
    with pytest.raises(ValueError, match="acceptance model"):
        bp.plan_batch(2, CPU_DEFAULTS, c, [])
    with pytest.raises(ValueError, match="ms > 0"):
        bp.BatchCosts({1: {1: 0.0}}, {1: {1: 1.0}})


def test_costs_between_and_past_the_measured_batch_sizes():
    c = costs(1.0, sizes=(1, 2, 4))
    assert c.target_ms(3, 1) == pytest.approx((c.target_ms(2, 1) + c.target_ms(4, 1)) / 2)
    assert c.target_ms(8, 2) == pytest.approx(c.target_ms(4, 2) + 2 * (c.target_ms(4, 2) - c.target_ms(2, 2)))
    with pytest.raises(ValueError, match="outside the measured"):
        c.target_ms(2, 64)
    with pytest.raises(ValueError, match="B=1 only"):
        bp.BatchCosts({1: {1: 1.0}}, {1: {1: 1.0}}).target_ms(2, 1)


def test_shipped_tables():
    """The CPU table is measured (package data); the GPU one is a prediction from the H200 B=1 costs, marked so."""
    cpu = bp.cpu_batch_costs()
    assert not cpu.predicted and set(cpu.target) >= {1, 2, 4, 8}
    gpu = bp.gpu_batch_costs(H200_UNFUSED)
    assert gpu.predicted and gpu.target_ms(4, 8) == pytest.approx(H200_UNFUSED.target_ms(32))
    for device in ("cpu", "cuda"):
        for b in (2, 4, 8):
            plan = bp.default_batch_plan(device, b, CPU_DEFAULTS)
            assert plan.rows == b and plan.reason and plan.predicted_costs == (device == "cuda")


def test_the_engine_follows_the_plan(monkeypatch):
    """A plan that says no: the batch decodes plainly (lossless) and its stats say why; a plan that speculates:
    its draft length is used. An explicit gamma is the caller's choice: no plan."""
    target = make_model("llama", seed=41)
    draft = noisy_copy(target, 0.1)
    prompts = [repetitive_prompt(3, 5, 4), random_prompt(4, 9)]
    want = [hf_greedy(target, p, 10) for p in prompts]
    for per_token, speculates in ((1.0, False), (0.0, True)):
        plan = bp.plan_batch(2, CPU_DEFAULTS, costs(per_token), MODELS)
        monkeypatch.setattr(ouroboros.api, "default_batch_plan", lambda *a, plan=plan: plan)
        out, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=10, return_stats=True)
        width = max(len(p) for p in prompts)
        assert [out[i, width:].tolist()[:len(w)] for i, w in enumerate(want)] == want
        assert stats.plan is plan and stats.summary()["plan"]["speculate"] is speculates
        assert {s.method for s in stats.rows} == {"ouroboros" if speculates else "greedy"}
        assert (stats.draft_forwards > 0) is speculates
        if speculates:
            assert stats.rows[0].config["gamma"] == plan.config.gamma
    _, stats = ouroboros.generate(target, draft, prompts, max_new_tokens=4, gamma=2, return_stats=True)
    assert stats.plan is None and stats.rows[0].config["gamma"] == 2
    assert torch.is_tensor(out)
