"""The recorded inputs of the cost model, read from the package data file ``data/cost_model.json``, and the GPU layout
they choose (:func:`choose_gpu_defaults`, whose layout ``ouroboros.core.config.GPU_DEFAULTS`` ships).

The data file holds numbers only; ``python -m bench.cost_model --write-data`` refits them from bench/results and
rewrites it. What each one is (measured or a goal, and what is extrapolated): the :mod:`ouroboros.tuning` docstring.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Mapping

from ouroboros.core.config import DecodeConfig
from ouroboros.tuning.acceptance import AcceptanceModel
from ouroboros.tuning.layout import Candidate, SearchSpace, choose_layout
from ouroboros.tuning.step_costs import StepCosts

__all__ = ["DATA_FILE", "read_data", "step_costs_from", "acceptance_from", "H200_UNFUSED", "H200_DEVICE",
           "ITEM1_TARGETS", "CHAIN_DECAY", "ACCEPTANCE", "GPU_SPACE", "OLD_GPU_LAYOUT", "choose_gpu_defaults"]

DATA_FILE = "data/cost_model.json"      # inside the package ouroboros.tuning


def read_data() -> dict:
    """The data file's JSON as written (key order kept), read through ``importlib.resources`` (so from an installed
    wheel as from a checkout); a fresh dict on every call."""
    return json.loads(resources.files("ouroboros.tuning").joinpath(DATA_FILE).read_text(encoding="utf-8"))


def step_costs_from(data: Mapping) -> dict[str, StepCosts]:
    """``{name: StepCosts}`` of the data's measured step costs, plus ``"item1_targets"``: the costs named by its
    ``shape_of``, mapped by :meth:`StepCosts.rescaled` onto the goals at T=1 and T=64."""
    costs = {name: StepCosts.from_dict(entry) for name, entry in data["step_costs"].items()}
    goals = data["item1_targets"]
    costs["item1_targets"] = costs[goals["shape_of"]].rescaled(
        tuple(goals["target_ms_t1_t64"]), tuple(goals["draft_ms_t1_t64"]), per_forward_ms=goals["per_forward_ms"],
        per_cycle_ms=goals["per_cycle_ms"], label=goals["label"])
    return costs


def acceptance_from(data: Mapping) -> dict[tuple[str, str], AcceptanceModel]:
    """``{(dataset, method): AcceptanceModel}`` in the data's order, every model with the data's ``chain_decay``."""
    return {(dataset, method): AcceptanceModel.from_dict({**entry, "chain_decay": data["chain_decay"]})
            for dataset, methods in data["acceptance"].items() for method, entry in methods.items()}


_DATA = read_data()
_COSTS = step_costs_from(_DATA)

# NVIDIA H200, torch 2.11, random bf16 weights with the real pair's configs, prompt 512 (H200 run 1): the target's
# verify through the host interface (tree upload + argmax read), and the graph replay alone.
H200_UNFUSED: StepCosts = _COSTS["h200_unfused"]
H200_DEVICE: StepCosts = _COSTS["h200_device"]
# The item-1 goals (steps <= 1.3x the lean decoder, SPEC §4; issue 17): H200_DEVICE's shape over T mapped onto them,
# the whole draft step inside the draft's graph (nothing extra per forward), 0.3 ms per cycle in one graph.
ITEM1_TARGETS: StepCosts = _COSTS["item1_targets"]
# b, fitted on both GSM8K trace methods' cycles at N = 4 (the only traces that verified suffixes, K = 1)
CHAIN_DECAY: float = _DATA["chain_decay"]
# The real Qwen2.5-Coder-1.5B/0.5B pair on a CPU, per dataset and method: ouroboros (a fresh pool per call, the
# default) and ouroboros_warm (the pool kept across prompts)
ACCEPTANCE: dict[tuple[str, str], AcceptanceModel] = acceptance_from(_DATA)
GPU_SPACE = SearchSpace()
OLD_GPU_LAYOUT = DecodeConfig(gamma=12, ngram=7, window=20, guess_set=20, topk=3)


def choose_gpu_defaults(costs: StepCosts = ITEM1_TARGETS) -> tuple[DecodeConfig, float, list[Candidate]]:
    """:func:`choose_layout` on the recorded inputs: ``costs`` (the item-1 targets unless given), the four
    acceptance models (HumanEval and GSM8K, fresh and warm pool, weighted alike), :data:`GPU_SPACE`, 256 tokens.
    For the item-1 targets its layout is ``ouroboros.core.config.GPU_DEFAULTS`` (a test holds it to that)."""
    return choose_layout(costs, tuple(ACCEPTANCE.values()), GPU_SPACE)
