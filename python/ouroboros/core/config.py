"""Decoding parameters and their device-aware defaults."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch

__all__ = ["DecodeConfig", "DRAFT_METHODS", "GPU_DEFAULTS", "GPU_LOOKAHEAD_DEFAULTS", "CPU_DEFAULTS",
           "CPU_LOOKAHEAD_DEFAULTS", "CPU_PROMPT_LOOKUP_DEFAULTS", "METHODS", "resolve_config"]

METHODS = ("greedy", "speculative", "lookahead", "prompt_lookup", "ouroboros")
DRAFT_METHODS = ("speculative", "ouroboros")            # the methods that run a draft model


@dataclass(frozen=True)
class DecodeConfig:
    """Parameters of SPEC §2 (names used everywhere).

    gamma: draft length in tokens per cycle. ngram: n-gram size N (phrases hold N-1 tokens). window: lookahead window
    width W (columns). guess_set: phrases per key G (pool capacity per key, and guesses verified per draft forward).
    topk: candidate suffixes K appended to the draft for verification.
    adaptive: let the draft length follow acceptance (HF's heuristic): +2 after a fully accepted draft, -1 after a
    rejection, between 1 and ``4 * gamma``; ``gamma`` is then the starting length.
    scored: the phrase pool ranks each key's phrases by how often they followed it (counts), not by recency alone.
    model_free: > 0 turns on model-free cycles (ouroboros, host loop): when the pool is sure enough of the
    continuation, the cycle verifies the pooled chain without drafting (:mod:`ouroboros.drafting.model_free`); the
    value is the floor of the chain's estimated probability, the measured costs decide each cycle.
    recycle: k > 0 keeps the target's top-k next tokens at every verified position as phrases in the pool
    (ouroboros, host loop: :mod:`ouroboros.decoding.recycle`).
    """

    gamma: int = 12
    ngram: int = 7
    window: int = 20
    guess_set: int = 20
    topk: int = 3
    adaptive: bool = True
    scored: bool = False
    model_free: float = 0.0
    recycle: int = 0

    def __post_init__(self) -> None:
        for name, low in (("gamma", 1), ("ngram", 2), ("window", 0), ("guess_set", 0), ("topk", 0), ("recycle", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name in ("adaptive", "scored"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.model_free, bool) or not isinstance(self.model_free, (int, float)) \
                or not 0.0 <= self.model_free < 1.0:
            raise ValueError(f"model_free must be a probability floor in [0, 1), got {self.model_free!r}")

    @property
    def max_gamma(self) -> int:
        return 4 * self.gamma if self.adaptive else self.gamma

    @property
    def pool_capacity(self) -> int:
        """Phrases a pool keeps per key: enough for ``guess_set`` guesses and ``topk`` suffixes, at least 1."""
        return max(self.guess_set, self.topk, 1)

    def as_dict(self) -> dict:
        return asdict(self)


# Chosen by the cost model (ouroboros.tuning.choose_gpu_defaults(); python -m bench.cost_model -> cost_model.json): the
# device cycle's step costs at the item-1 targets (target verify 2.6 ms at T=1 / 3.1 at T=64, draft step 1.6 / 2.0,
# 0.3 ms bookkeeping per cycle; the H200 run-1 shape over T), acceptance fitted on the real-pair CPU traces and runs
# (HumanEval and GSM8K, fresh and warm pool: trunk acceptance 0.87-0.92 for the first 2 tokens, 0.91-0.95 after;
# 1.4-2.1 tokens per draft forward at G=1..3, N=4), 256 new tokens. A draft forward (~65% of a verify) yields ~2
# tokens, while suffixes in the target tree are nearly free, so: short adaptive drafts (cap 4*gamma = 4 tokens), 3
# pooled guesses of N-1 = 7 tokens (draft layout 9 + 3*7 = 30 tokens, bucket 32), and 3 suffixes of 7 in the target
# tree (1 + 4 + 21 = 26 nodes, bucket 32). Model-predicted decode: 0.613 tokens/ms vs 0.485 for the original layout
# (gamma 12, N 7, W 20, G 20, K 3: a 241-token draft layout); at the measured unfused H200 costs 0.197 vs 0.136 (the
# same choice). Extrapolated: N > 5, K > 1 (the runs had N 4-5, G 1-3, K 0-1) and any window (never measured: W = 0).
GPU_DEFAULTS = DecodeConfig(gamma=1, ngram=8, window=0, guess_set=3, topk=3)
# On a CPU a tree forward is not free: with our small-M linear (``ouroboros.hf.cpu_linear``) 2-4 tokens cost about one
# token's forward and 5-9 tokens about twice that (real Qwen2.5-Coder pair, fp32, 2-core AMD EPYC; without it 3-5x).
# So there is no Jacobi window, and no phrase is concatenated to the verified draft (topk=0): a 3-token suffix made
# each target forward about 9% dearer while saving only 4% of them (HumanEval prompts 10-15: ouroboros 2.30x HF
# greedy with topk=1, 2.41x with topk=0, speculative 2.18x; bench/results/cpu_sweep_topk_int8draft.json).
# The draft forward carries three pooled guesses (1 + 3 * (N-1) = 10 tokens): the default int8 draft
# (``ouroboros.hf.quantize``) costs 78-114 ms for 1-13 tokens, so guesses are nearly free, and with 3 instead of 1 the
# draft needs 5% fewer forwards from a cold pool and 15% fewer from a warm one
# (bench/results/cpu_sweep_guess_set_int8draft.json). Tuned for that int8 draft; with a float32 draft
# (draft_quant="none") the 10-token draft forward was not re-measured.
CPU_DEFAULTS = DecodeConfig(gamma=8, ngram=4, window=0, guess_set=3, topk=0)
# Lookahead decoding IS the window and the guesses: with CPU_DEFAULTS it would run as plain greedy. A small window
# keeps its forward at 1 + (W + G) * (N - 1) = 13 tokens on a CPU.
CPU_LOOKAHEAD_DEFAULTS = DecodeConfig(gamma=8, ngram=4, window=2, guess_set=2, topk=1)
# Prompt lookup IS the concatenated phrase (it has no draft model): one suffix of N-1 tokens per verification.
CPU_PROMPT_LOOKUP_DEFAULTS = replace(CPU_DEFAULTS, topk=1)
_CPU_METHOD_DEFAULTS = {"lookahead": CPU_LOOKAHEAD_DEFAULTS, "prompt_lookup": CPU_PROMPT_LOOKUP_DEFAULTS}
# Lookahead decoding IS the window: on a GPU it keeps the original code's wide one (the cost model above has no draft
# model for it to weigh against).
GPU_LOOKAHEAD_DEFAULTS = DecodeConfig(gamma=12, ngram=7, window=20, guess_set=20, topk=3)
_GPU_METHOD_DEFAULTS = {"lookahead": GPU_LOOKAHEAD_DEFAULTS}


# Sampling with ouroboros on a CPU: the draft samples its trunk from its own distribution q (``draft_sampling``), each
# token accepted with min(1, r/q) instead of r(x) for a one-hot proposal. HumanEval T=0.7, top_p 0.95, 128 tokens,
# same runs: tuning prompts 0-4 7.48 tokens per target forward and 1.86x HF sampling against 5.87 and 1.57x one-hot
# (bench/results/ablation/humaneval_0-4_128_sample_t0.7.json). The device cycle samples nothing, so on a GPU (where
# sampling runs the host loop, unmeasured) and with a device pool it stays off.
SAMPLING_DRAFT_METHODS_CPU = ("ouroboros",)


def default_draft_sampling(device: torch.device | str, method: str, device_pool: bool) -> bool:
    """Whether a sampling call samples its draft when the caller did not say (``draft_sampling=None``): on a CPU for
    :data:`SAMPLING_DRAFT_METHODS_CPU` with the host pool, else not (see the measurement above)."""
    return torch.device(device).type == "cpu" and method in SAMPLING_DRAFT_METHODS_CPU and not device_pool


def resolve_config(device: torch.device | str, method: str | None = None, **overrides: int | None) -> DecodeConfig:
    """The defaults for ``device`` and ``method`` with non-None ``overrides`` applied.

    "cuda" -> GPU_DEFAULTS (GPU_LOOKAHEAD_DEFAULTS for ``method="lookahead"``); otherwise CPU_DEFAULTS, or CPU_LOOKAHEAD_DEFAULTS for ``method="lookahead"`` and
    CPU_PROMPT_LOOKUP_DEFAULTS for ``method="prompt_lookup"``.
    """
    if torch.device(device).type == "cuda":
        base = _GPU_METHOD_DEFAULTS.get(method, GPU_DEFAULTS)
    else:
        base = _CPU_METHOD_DEFAULTS.get(method, CPU_DEFAULTS)
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
