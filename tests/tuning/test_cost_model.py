"""The cost model behind GPU_DEFAULTS (``ouroboros.tuning``): fits recover known parameters, the choice finds a
hand-computed optimum, the shipped GPU_DEFAULTS are the model's choice on the recorded inputs, and those inputs are
package data that the refit (``python -m bench.cost_model``) reproduces."""
from __future__ import annotations

import ast
import json
import random
from importlib import resources
from pathlib import Path

import ouroboros.tuning as cm
import pytest
from bench import cost_model as refit_script
from ouroboros.core.config import GPU_DEFAULTS, DecodeConfig
from ouroboros.tuning.recorded import DATA_FILE, acceptance_from, read_data, step_costs_from
from ouroboros.tuning.step_costs import bucket

ROOT = Path(__file__).resolve().parents[2]


def _geometric_cycles(rng: random.Random, n: int, head: float, tail: float, heads: int = 2) -> list[dict]:
    """Traced cycles whose trunk token i is accepted with ``head`` (i <= heads) or ``tail``, draft lengths 1..12."""
    cycles = []
    for _ in range(n):
        length = rng.randint(1, 12)
        m = 0
        while m < length and rng.random() < (head if m < heads else tail):
            m += 1
        cycles.append({"draft_len": length, "accepted": m + 1, "verified": m + 1, "tree_size": length + 1})
    return cycles


def test_fit_recovers_a_known_alpha():
    rng = random.Random(0)
    cycles = _geometric_cycles(rng, 4000, 0.8, 0.8)
    assert cm.fit_trunk_alpha(cycles) == pytest.approx(0.8, abs=0.015)
    split = _geometric_cycles(rng, 6000, 0.6, 0.9)
    assert cm.fit_trunk_alpha(split, 1, 2) == pytest.approx(0.6, abs=0.02)
    assert cm.fit_trunk_alpha(split, 3) == pytest.approx(0.9, abs=0.015)
    with pytest.raises(ValueError, match="positions"):
        cm.fit_trunk_alpha([{"draft_len": 0, "accepted": 1}])


def test_fit_recovers_known_chain_yield_and_suffix_parameters():
    rng = random.Random(1)
    b, cycles = 0.7, []
    for _ in range(3000):                   # whole trunk of 5 accepted, then a suffix run of j <= 3 tokens
        j = 0
        if rng.random() < 0.5:
            j = 1
            while j < 3 and rng.random() < b:
                j += 1
        cycles.append({"draft_len": 5, "accepted": 5 + j + 1})
    assert cm.fit_chain_decay(cycles, 4) == pytest.approx(b, abs=0.03)

    truth = cm.AcceptanceModel(0.9, 0.6, 0.25, 0.66, 0.8)
    points = [cm.YieldPoint(c, n, truth.draft_yield(c, n)) for c, n in ((1, 4), (2, 4), (3, 4), (2, 5))]
    assert cm.fit_yield(points, 0.66) == (pytest.approx(0.6, abs=1e-3), pytest.approx(0.25, abs=1e-9))
    spoints = [cm.SuffixPoint(k, 4, truth.suffix_tokens(k, 4)) for k in (1, 2)]
    assert cm.fit_suffix(spoints, 0.25, 0.66) == pytest.approx(0.8, abs=1e-3)


def test_choose_layout_finds_a_hand_computed_optimum():
    """Fixed draft length g, one token per draft forward, no suffixes: tokens/cycle = 1 + sum_{i<=g} 0.9^i and
    ms/cycle = 1 + 0.1 g, whose best g is 10 (3.4314 tokens/ms; g = 9 gives 3.4276)."""
    costs = cm.StepCosts(target={1: 1.0, 128: 1.0}, draft={1: 0.1, 64: 0.1})
    accept = cm.AcceptanceModel(alpha=0.9, yield_first=0.0, yield_decay=0.0, chain_decay=0.5, suffix_first=0.0)
    space = cm.SearchSpace(gammas=tuple(range(1, 16)), ngrams=(4,), chains=(1,), topks=(0,), adaptive=(False,))
    cfg, rate, table = cm.choose_layout(costs, accept, space, tolerance=0.0)

    def hand(g: int) -> float:
        return (1 + sum(0.9 ** i for i in range(1, g + 1))) / (1 + 0.1 * g)

    assert cfg == DecodeConfig(gamma=10, ngram=4, window=0, guess_set=1, topk=0, adaptive=False)
    assert max(range(1, 16), key=hand) == 10
    assert rate == pytest.approx(hand(10), rel=1e-9)
    assert [c.config.gamma for c in table[:3]] == sorted(range(1, 16), key=hand, reverse=True)[:3]


def test_ties_go_to_the_smaller_buckets():
    """Flat costs: more chains always add a little yield, so the best layout is the widest; within the tolerance
    the choice takes a smaller draft bucket, and never a layout over max_draft_tokens."""
    costs = cm.StepCosts(target={1: 3.0, 128: 3.0}, draft={1: 2.0, 64: 2.0})
    accept = cm.AcceptanceModel(0.9, 0.6, 0.25, 0.66, 0.8, alpha_head=0.85)
    space = cm.SearchSpace(gammas=(2,), ngrams=(5,), chains=tuple(range(1, 16)), topks=(1,))
    cfg, rate, table = cm.choose_layout(costs, accept, space, tolerance=0.01)
    best = table[0]
    assert cm.draft_layout_tokens(best.config) <= 64 and cm.draft_layout_tokens(cfg) <= 64
    assert bucket(cm.draft_layout_tokens(cfg)) < best.predictions[0].draft_bucket
    assert rate >= 0.99 * best.tokens_per_ms
    assert cm.choose_layout(costs, accept, space, tolerance=0.0)[0] == best.config


def test_adaptive_gamma_follows_acceptance():
    costs = cm.StepCosts(target={1: 1.0, 128: 1.0}, draft={1: 1.0, 64: 1.0})
    cfg = DecodeConfig(gamma=2, ngram=4, window=0, guess_set=1, topk=0)
    sure = cm.predict(cfg, costs, cm.AcceptanceModel(0.999, 0.0, 0.0, 0.5, 0.0), new_tokens=2000)
    never = cm.predict(cfg, costs, cm.AcceptanceModel(0.0, 0.0, 0.0, 0.5, 0.0), new_tokens=2000)
    assert sure.mean_gamma > 0.95 * cfg.max_gamma
    assert never.mean_gamma == pytest.approx(1.0, abs=0.01) and never.tokens_per_cycle == pytest.approx(1.0)


def test_step_costs_interpolate_in_buckets_and_refuse_the_unmeasured():
    costs = cm.StepCosts(target={1: 2.0, 16: 3.0, 64: 4.0}, draft={1: 1.0, 256: 2.0})
    assert costs.target_ms(1) == 2.0 and costs.target_ms(10) == 3.0 and costs.target_ms(17) == pytest.approx(3 + 16 / 48)
    assert costs.draft_ms(100) == pytest.approx(1.0 + 127 / 255)
    with pytest.raises(ValueError, match="outside the measured"):
        costs.target_ms(65)
    with pytest.raises(ValueError, match="largest bucket"):
        bucket(513)
    assert bucket(0) == 1 and bucket(17) == 32 and bucket(512) == 512
    scaled = cm.H200_DEVICE.rescaled((2.6, 3.1), (1.6, 2.0), per_forward_ms=0.0, per_cycle_ms=0.3, label="t")
    assert scaled.target_ms(1) == 2.6 and scaled.target_ms(64) == 3.1
    assert scaled.draft_ms(1) == 1.6 and scaled.draft_ms(64) == 2.0
    assert cm.ITEM1_TARGETS.target == scaled.target and cm.ITEM1_TARGETS.draft == scaled.draft


@pytest.mark.parametrize("bad", [dict(alpha=1.0), dict(alpha_head=-0.1), dict(yield_first=-1.0), dict(head=-1)])
def test_bad_acceptance_parameters_are_refused(bad):
    args = dict(alpha=0.9, yield_first=0.5, yield_decay=0.2, chain_decay=0.6, suffix_first=0.5) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        cm.AcceptanceModel(**args)


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="T >= 1"):
        cm.StepCosts(target={}, draft={1: 1.0})
    with pytest.raises(ValueError, match="at least one"):
        cm.choose_layout(cm.ITEM1_TARGETS, [])
    with pytest.raises(ValueError, match="new_tokens"):
        cm.predict(GPU_DEFAULTS, cm.ITEM1_TARGETS, cm.ACCEPTANCE["humaneval", "ouroboros"], new_tokens=0)
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps({"methods": {"ouroboros": {"prompts": [{"trace": []}]}}}))
    with pytest.raises(ValueError, match="no method 'ouroboros_typo'"):
        cm.load_trace_cycles(traces, "ouroboros_typo")
    with pytest.raises(ValueError, match="no cycle|no traced"):
        cm.fit_trunk_alpha(cm.load_trace_cycles(traces, "ouroboros")[0])


def test_predict_replay_adds_up():
    record = {"mean_draft_forwards": 2.0, "mean_tree_size": 9.5, "mean_accepted": 4.0, "cycles": 10,
              "ms_per_cycle": 10.0, "tok_s": 400.0, "split_seconds": {"draft": 0.05, "verify": 0.04}}
    costs = cm.StepCosts(target={1: 2.0, 16: 4.0}, draft={1: 1.0})
    got = cm.predict_replay(costs, record, 2.5, 1.0)
    assert got["predicted_ms_per_cycle"]["total"] == 2 * 2.5 + 4.0 + 1.0
    assert got["predicted_tok_s"] == 400.0 and got["error"] == 0.0
    assert got["replayed_ms_per_cycle"]["draft"] == 5.0


def test_shipped_gpu_defaults_are_the_models_choice():
    """GPU_DEFAULTS == choose_layout on the recorded inputs (item-1 targets), with a draft layout <= 64 tokens and
    a better prediction than the original layout; the written JSON says the same."""
    cfg, rate, _ = cm.choose_gpu_defaults()
    assert cfg == GPU_DEFAULTS
    assert cm.draft_layout_tokens(GPU_DEFAULTS) <= 64
    old = [cm.predict(cm.OLD_GPU_LAYOUT, cm.ITEM1_TARGETS, m).tokens_per_ms for m in cm.ACCEPTANCE.values()]
    assert rate > sum(old) / len(old)
    written = ROOT / "bench" / "results" / "cost_model.json"
    if written.exists():
        data = json.loads(written.read_text())["choice_item1_targets"]
        # the file may predate later DecodeConfig fields (scored, model_free, recycle: off by default)
        assert DecodeConfig(**data["chosen"]) == GPU_DEFAULTS and data["shipped_equals_chosen"]


def test_the_recorded_inputs_are_package_data():
    """The recorded inputs load from the package's data file (a resource of ``ouroboros.tuning``, so an installed
    wheel has it too): the step costs and models as written, every model with the one chain decay, in the data's
    order, the item-1 targets derived from the device costs; each type reads back what it writes."""
    assert resources.files("ouroboros.tuning").joinpath(DATA_FILE).is_file()
    data = read_data()
    costs = step_costs_from(data)
    assert (costs["h200_unfused"], costs["h200_device"], costs["item1_targets"]) == \
        (cm.H200_UNFUSED, cm.H200_DEVICE, cm.ITEM1_TARGETS)
    assert cm.H200_DEVICE.draft == cm.H200_UNFUSED.draft and cm.H200_DEVICE.target != cm.H200_UNFUSED.target
    assert acceptance_from(data) == cm.ACCEPTANCE and cm.CHAIN_DECAY == data["chain_decay"]
    assert list(cm.ACCEPTANCE) == [(d, m) for d in ("humaneval", "gsm8k") for m in ("ouroboros", "ouroboros_warm")]
    assert {m.chain_decay for m in cm.ACCEPTANCE.values()} == {cm.CHAIN_DECAY}
    for c in (cm.H200_UNFUSED, cm.ITEM1_TARGETS):
        assert cm.StepCosts.from_dict(json.loads(json.dumps(c.as_dict()))) == c
    for m in cm.ACCEPTANCE.values():
        assert cm.AcceptanceModel.from_dict(json.loads(json.dumps(m.as_dict()))) == m
    read_data()["chain_decay"] = 0.0                  # a fresh dict each time: the loaded inputs cannot be altered
    assert read_data()["chain_decay"] == cm.CHAIN_DECAY


def test_the_package_names_no_path_into_bench():
    """Fitted constants are package data: no code string of ``ouroboros.tuning`` (docstrings aside) names bench/."""
    found = []
    for path in sorted(Path(cm.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{path.name}:{n.lineno}" for n in ast.walk(tree) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str) and "bench/" in n.value and id(n) not in docs]
    assert found == []


def test_the_refit_reproduces_the_shipped_data():
    """``python -m bench.cost_model --write-data`` would write the shipped data file unchanged: every step cost, the
    chain decay and every acceptance model refit from the recorded runs to the numbers shipped."""
    missing = [str(p.relative_to(ROOT)) for p in refit_script.input_files() if not p.exists()]
    if missing:
        pytest.skip(f"the recorded runs are not in this checkout: {missing}")
    fitted = refit_script.fitted_data()
    assert refit_script.refit(fitted) == dict.fromkeys(
        ["H200_UNFUSED", "H200_DEVICE", "CHAIN_DECAY", *(m.label for m in cm.ACCEPTANCE.values())], True)
    assert fitted == read_data()
