"""Tuning: the cost model of the device cycle and the GPU layout it chooses (issue 17 item 4), and the measurement
probes (:mod:`ouroboros.tuning.probes`: host reads, kernel counts; imported on its own, it needs torch).

The cost model, re-exported here (``import ouroboros.tuning as cm; cm.predict(...)``), is built in layers:
:mod:`~ouroboros.tuning.step_costs` (ms per forward over measured buckets) and :mod:`~ouroboros.tuning.acceptance`
(tokens per cycle, and the fits) feed :mod:`~ouroboros.tuning.layout` (one cycle's cost and yield, the prediction
over a generation, the choice of a layout); :mod:`~ouroboros.tuning.recorded` reads the fitted inputs from the
package data file ``data/cost_model.json`` and chooses the shipped GPU layout with them.

**What is measured and what is extrapolated** (say it wherever a choice is quoted):

- alpha, a, r, c are measured at N = 4 (one N = 5 run), W = 0, G in 1..3, K in 0..1, gamma 8 adaptive: CPU runs
  of the real Qwen2.5-Coder-1.5B/0.5B pair (float32 target, mostly the int8 draft), 10 + 6 HumanEval and 10 GSM8K
  prompts of 128 tokens; b rests on the 30 + 45 suffix runs (K = 1, at most 3 tokens) the GSM8K traces accepted.
  Larger N, G > 3, K > 1 follow the functional forms, not data; the search stops at N = 8 (chains about twice the
  measured length).
- No run with the real draft had a window (W > 0). Window columns are counted as chains (C = W + G), so the model
  cannot tell W from G; :class:`SearchSpace` gives every chain to G (the measured kind), W = 0.
- Acceptance has no memory from cycle to cycle. GSM8K's traces show none, HumanEval's some (a whole trunk is
  accepted 0.57-0.65 of the time after a full trunk, 0.38-0.47 after a rejection, though the draft is then 3 tokens
  longer): the model undervalues long drafts and the adaptive rule there, which it never switches off. A device
  phase can end short of g when its forwards yield less than the mean: the model assumes it reaches g.
- Step costs: :data:`H200_UNFUSED` is measured (H200 run 1, random bf16 weights, real shapes, prompt 512; the draft
  at T = 32, 64, 128 is interpolated between the measured T = 16 and 256). :data:`ITEM1_TARGETS` maps that measured
  shape onto the item-1 goals (target 2.6 ms at T=1 / 3.1 at T=64, draft step 1.6 / 2.0, 0.3 ms bookkeeping per
  cycle): costs we are building towards, not measured ones. Trees past the measured buckets are refused.
"""
from __future__ import annotations

from ouroboros.tuning.acceptance import (
    HEAD_TOKENS,
    AcceptanceModel,
    SuffixPoint,
    YieldPoint,
    fit_acceptance,
    fit_chain_decay,
    fit_suffix,
    fit_trunk_alpha,
    fit_yield,
    load_trace_cycles,
    suffix_points,
    yield_points,
)
from ouroboros.tuning.layout import (
    Candidate,
    Prediction,
    SearchSpace,
    choose_layout,
    draft_layout_tokens,
    predict,
    predict_replay,
    verify_tree_nodes,
)
from ouroboros.tuning.recorded import (
    ACCEPTANCE,
    CHAIN_DECAY,
    GPU_SPACE,
    H200_DEVICE,
    H200_UNFUSED,
    ITEM1_TARGETS,
    OLD_GPU_LAYOUT,
    choose_gpu_defaults,
)
from ouroboros.tuning.step_costs import StepCosts, load_step_costs

__all__ = ["StepCosts", "AcceptanceModel", "Prediction", "SearchSpace", "Candidate", "YieldPoint", "SuffixPoint",
           "load_step_costs", "load_trace_cycles", "fit_trunk_alpha", "fit_chain_decay", "yield_points",
           "suffix_points", "fit_yield", "fit_suffix", "fit_acceptance", "predict", "choose_layout",
           "predict_replay", "choose_gpu_defaults", "draft_layout_tokens", "verify_tree_nodes", "HEAD_TOKENS",
           "H200_UNFUSED", "H200_DEVICE", "ITEM1_TARGETS", "CHAIN_DECAY", "ACCEPTANCE", "GPU_SPACE",
           "OLD_GPU_LAYOUT"]
