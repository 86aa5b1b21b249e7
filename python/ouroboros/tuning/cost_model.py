"""A cost model of the device cycle, and the GPU layout (gamma, N, W, G, K) it chooses (issue 17 item 4).

**One cycle** of the device path (:mod:`ouroboros.drafting.device_drafter`, :class:`ouroboros.engine.Drafter`) for a
:class:`~ouroboros.core.config.DecodeConfig`, with C = W + G chains and this cycle's draft length g:

- draft phase: ``F(g) = ceil(g / y)`` forwards (the drafter's budget; y = tokens per draft forward; the model uses
  its mean over a varying yield, ``g / y + 1/2``, at least 1, at most g). The first forward carries N + 1 pending
  slots, the others 1, each followed by C chains of N - 1 tokens, padded to a bucket of ``static.BUCKETS``:
  ``draft(N + 1 + C(N-1)) + (F - 1) draft(1 + C(N-1)) + F per_forward_ms``;
- verification: one fixed tree of ``1 + gamma_cap + K(N-1)`` nodes (gamma_cap = 4 gamma when adaptive, else
  gamma) in its bucket, ``target(nodes)``, plus ``per_cycle_ms`` of bookkeeping;
- tokens: the accepted trunk, the bonus token, and what the K suffixes add when the whole trunk is accepted:
  ``sum_{i<=g} P(first i accepted) + 1 + P(first g accepted) suffix(K, N)``;
- adaptive gamma (HF's rule): g -> min(g + 2, cap) after a fully accepted trunk, else max(g - 1, 1), from g = gamma.
  The distribution of g is carried cycle by cycle over a generation of ``new_tokens`` tokens, and
  tokens/ms = new_tokens / its expected ms (decode only, no prefill).

**Acceptance** (:class:`AcceptanceModel`, fitted by :func:`fit_acceptance` on the real-pair CPU runs):
a trunk token is accepted with probability ``alpha_head`` at the first HEAD_TOKENS positions and ``alpha`` after
them (censored-geometric MLEs over the traced cycles: the traces reject the first two tokens about 1.5x as often);
tokens per draft forward ``y(C, N) = 1 + a (1 - r^C)/(1 - r) s(N)`` (each further chain, a newest-first pool phrase,
adds r times what the one before added; ``s(N) = (1 - b^(N-1)) / (1 - b^3)`` scales the accepted chain length from
N = 4 with b, the chance an accepted phrase token is followed by another: the MLE over the suffix runs the GSM8K
traces accepted); ``suffix(K, N) = min(N - 1, c (1 - r^K)/(1 - r) s(N))``.

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

import json
import operator
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Mapping, Sequence

from ouroboros.core.buckets import BUCKETS
from ouroboros.core.config import DecodeConfig

__all__ = ["StepCosts", "AcceptanceModel", "Prediction", "SearchSpace", "Candidate", "YieldPoint", "SuffixPoint",
           "load_step_costs", "load_trace_cycles", "fit_trunk_alpha", "fit_chain_decay", "yield_points",
           "suffix_points", "fit_yield", "fit_suffix", "fit_acceptance", "predict", "choose_layout",
           "predict_replay", "choose_gpu_defaults", "draft_layout_tokens", "verify_tree_nodes", "HEAD_TOKENS",
           "H200_RUN1", "H200_UNFUSED", "H200_DEVICE", "ITEM1_TARGETS", "SCENARIO_FILES", "CHAIN_DECAY",
           "ACCEPTANCE", "GPU_SPACE", "OLD_GPU_LAYOUT"]


# ---------------------------------------------------------------------------------------------------- step costs
def bucket(tokens: int) -> int:
    """The static-runner bucket (``static.BUCKETS``) that holds ``tokens`` tokens; ValueError past the largest."""
    for b in BUCKETS:
        if tokens <= b:
            return b
    raise ValueError(f"{tokens} tokens exceed the largest bucket {BUCKETS[-1]}")


def _interpolate(points: Mapping[int, float], t: int, what: str) -> float:
    """Piecewise-linear in T over ``points``; ValueError outside them (no extrapolation)."""
    keys = sorted(points)
    if not keys[0] <= t <= keys[-1]:
        raise ValueError(f"{what} step cost at T={t} is outside the measured points T={keys[0]}..{keys[-1]}")
    for lo, hi in zip(keys, keys[1:]):
        if lo <= t <= hi:
            return points[lo] + (points[hi] - points[lo]) * (t - lo) / (hi - lo)
    return points[keys[0]]


@dataclass(frozen=True)
class StepCosts:
    """Milliseconds per forward as a function of its token count T (piecewise-linear over measured buckets).

    target: the target's verification forward, ``{T: ms}``; draft: a draft forward, ``{T: ms}``;
    per_forward_ms: what a draft step adds to its forward (pool lookup, acceptance, window, KV commit);
    per_cycle_ms: bookkeeping once per cycle (KV keep, tree build, pool updates, the host read).
    """

    target: Mapping[int, float]
    draft: Mapping[int, float]
    per_forward_ms: float = 0.0
    per_cycle_ms: float = 0.0
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("target", "draft"):
            points = getattr(self, name)
            if not points or any(not isinstance(t, int) or t < 1 or not ms > 0 for t, ms in points.items()):
                raise ValueError(f"{name} step costs must map T >= 1 to ms > 0, got {points!r}")
        if not (self.per_forward_ms >= 0 and self.per_cycle_ms >= 0):
            raise ValueError(f"bookkeeping ms must be >= 0, got {self.per_forward_ms}, {self.per_cycle_ms}")

    def target_ms(self, tokens: int) -> float:
        """One target forward over a tree of ``tokens`` nodes, run in its bucket."""
        return _interpolate(self.target, bucket(tokens), "target")

    def draft_ms(self, tokens: int) -> float:
        """One draft forward over ``tokens`` layout tokens, run in its bucket."""
        return _interpolate(self.draft, bucket(tokens), "draft")

    def rescaled(self, target: tuple[float, float], draft: tuple[float, float], *, per_forward_ms: float,
                 per_cycle_ms: float, label: str) -> StepCosts:
        """These costs' shape over T, mapped affinely so that T=1 and T=64 cost ``(ms at T=1, ms at T=64)``
        (every bucket inside the measured range gets a point)."""
        def scale(points: Mapping[int, float], ends: tuple[float, float], what: str) -> dict[int, float]:
            full = {t: _interpolate(points, t, what) for t in BUCKETS if min(points) <= t <= max(points)}
            lo, hi = full[1], full[64]
            return {t: round(ends[0] + (ms - lo) * (ends[1] - ends[0]) / (hi - lo), 4) for t, ms in full.items()}

        return StepCosts(scale(self.target, target, "target"), scale(self.draft, draft, "draft"), per_forward_ms,
                         per_cycle_ms, label)

    def as_dict(self) -> dict:
        return {"label": self.label, "target_ms": {str(t): round(v, 4) for t, v in sorted(self.target.items())},
                "draft_ms": {str(t): round(v, 4) for t, v in sorted(self.draft.items())},
                "per_forward_ms": self.per_forward_ms, "per_cycle_ms": self.per_cycle_ms}


def load_step_costs(e2e_gpu_json: str | Path, *, interface: str = "host") -> StepCosts:
    """The unfused step costs a ``bench/e2e_gpu.py`` run measured: the target's verify per bucket (``interface``
    "host": through ``forward_tree``, tree upload + argmax read, what the engine and the replay pay; "device": the
    graph replay alone), the draft forward at T = 1, 16 and at the measured draft layout's bucket, that draft step's
    overhead per forward, and per cycle the tree build + mask + walk and the host pool updates (an insert and the
    suffix replacement; the KV keep gathers only a non-contiguous path, so it is not in it)."""
    if interface not in ("host", "device"):
        raise ValueError(f"interface must be 'host' or 'device', got {interface!r}")
    data = json.loads(Path(e2e_gpu_json).read_text())
    steps = next((p["step_costs"] for p in (data.get("pairs") or {}).values() if "step_costs" in p), None)
    if steps is None:
        raise ValueError(f"{e2e_gpu_json} has no step_costs (that stage did not run)")
    lay, book = steps["draft_layout"], steps["bookkeeping"]
    draft = {int(t): float(v) for t, v in steps["draft_forward_device"].items()}
    draft[int(lay["tokens_bucket"])] = float(lay["forward_ms"])
    target = steps["target_verify_host_interface" if interface == "host" else "target_verify_device"]
    per_cycle = book["host_tree_build_mask_walk"] + book["host_adapter_pool_insert_4"] \
        + book["host_adapter_pool_replace_topk"]
    return StepCosts({int(t): float(v) for t, v in target.items()}, draft, round(lay["step_overhead_ms"], 4),
                     round(per_cycle, 4), f"{data.get('card', '?')} unfused ({interface} verify), {e2e_gpu_json}")


# ---------------------------------------------------------------------------------------------------- acceptance
HEAD_TOKENS = 2     # trunk positions with their own acceptance (the traces reject them about 1.5x as often)


def _geometric_sum(n: int, r: float) -> float:
    """1 + r + ... + r^(n-1)."""
    return float(n) if r == 1.0 else (1.0 - r ** n) / (1.0 - r)


@dataclass(frozen=True)
class AcceptanceModel:
    """How many tokens a cycle yields (the formulas, and what is extrapolated: the module docstring).

    alpha: per-token trunk acceptance after the first ``head`` positions, which accept with ``alpha_head`` (None:
    alpha); yield_first (a): tokens the first chain adds per draft forward at N = 4; yield_decay (r): each further
    chain adds r times the one before (so does each further suffix); chain_decay (b): the chance an accepted phrase
    token is followed by another (the N dependence); suffix_first (c): tokens one suffix adds after a fully accepted
    trunk at N = 4.
    """

    alpha: float
    yield_first: float
    yield_decay: float
    chain_decay: float
    suffix_first: float
    alpha_head: float | None = None
    head: int = HEAD_TOKENS
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("alpha", "alpha_head", "yield_decay", "chain_decay"):
            value = getattr(self, name)
            if not (value is None and name == "alpha_head") and not (isinstance(value, float | int)
                                                                     and 0.0 <= value < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not (self.yield_first >= 0 and self.suffix_first >= 0):
            raise ValueError(f"yield_first and suffix_first must be >= 0, got {self.yield_first}, {self.suffix_first}")
        if not isinstance(self.head, int) or self.head < 0:
            raise ValueError(f"head must be an int >= 0, got {self.head!r}")

    def trunk_reach(self, cap: int) -> list[float]:
        """``[P(the first g trunk tokens are all accepted) for g in 1..cap]``."""
        head = self.alpha if self.alpha_head is None else self.alpha_head
        out, p = [], 1.0
        for g in range(1, cap + 1):
            p *= head if g <= self.head else self.alpha
            out.append(p)
        return out

    def chain_scale(self, ngram: int) -> float:
        """The accepted chain length at ``ngram`` relative to N = 4."""
        return _geometric_sum(ngram - 1, self.chain_decay) / _geometric_sum(3, self.chain_decay)

    def draft_yield(self, chains: int, ngram: int) -> float:
        """Tokens per draft forward with ``chains`` chains of ``ngram - 1`` tokens (1..N; 1 without chains)."""
        extra = self.yield_first * _geometric_sum(chains, self.yield_decay) * self.chain_scale(ngram)
        return min(1.0 + extra, float(ngram))

    def suffix_tokens(self, topk: int, ngram: int) -> float:
        """Tokens ``topk`` suffixes add after a fully accepted trunk (0..N-1)."""
        extra = self.suffix_first * _geometric_sum(topk, self.yield_decay) * self.chain_scale(ngram)
        return min(extra, float(ngram - 1))

    def as_dict(self) -> dict:
        return {"label": self.label, "alpha": self.alpha, "alpha_head": self.alpha_head, "head": self.head,
                "yield_first": self.yield_first, "yield_decay": self.yield_decay, "chain_decay": self.chain_decay,
                "suffix_first": self.suffix_first}


def load_trace_cycles(path: str | Path, method: str) -> tuple[list[dict], dict]:
    """The cycles of ``method`` in a real-models traces file (bench/results/traces_*.json), and its parameters."""
    methods = json.loads(Path(path).read_text()).get("methods", {})
    if method not in methods:
        raise ValueError(f"{path} has no method {method!r} (has {sorted(methods)})")
    entry = methods[method]
    return [c for p in entry["prompts"] for c in p["trace"]], entry.get("resolved_params") or {}


def _trunk_outcome(cycle: dict) -> tuple[int, int, bool]:
    """(draft length L, trunk tokens accepted m <= L, whole trunk accepted) of one traced cycle."""
    length = int(cycle["draft_len"])
    m = min(int(cycle.get("verified", cycle["accepted"])) - 1, length)
    return length, m, m >= length


def fit_trunk_alpha(cycles: Sequence[dict], first: int = 1, last: int | None = None) -> float:
    """Per-token trunk acceptance at trunk positions ``first..last`` (1-based, inclusive; None: no end): the MLE of
    a geometric run censored at the draft length = tokens accepted there / (those + rejections there).
    ValueError when no traced token reached those positions."""
    accepted = rejected = 0
    end = float("inf") if last is None else last
    for c in cycles:
        length, m, full = _trunk_outcome(c)
        accepted += max(0, int(min(m, end)) - first + 1)
        rejected += not full and first <= m + 1 <= end
    if accepted + rejected == 0:
        raise ValueError(f"no traced trunk token at positions {first}..{last} to fit alpha on")
    return accepted / (accepted + rejected)


def fit_chain_decay(cycles: Sequence[dict], ngram: int) -> float:
    """b: over the suffix runs of traced cycles that verified suffixes (j >= 1 suffix tokens accepted after a whole
    trunk), continuations / (continuations + stops), a run of N - 1 being censored. ValueError without such runs."""
    cont = stops = 0
    for c in cycles:
        length, _, full = _trunk_outcome(c)
        j = int(c.get("verified", c["accepted"])) - 1 - length
        if length and full and j >= 1:
            cont += j - 1
            stops += j < ngram - 1
    if cont + stops == 0:
        raise ValueError("no accepted suffix run to fit the chain continuation on")
    return cont / (cont + stops)


@dataclass(frozen=True)
class YieldPoint:
    """A measured number of tokens per draft forward with ``chains`` chains of ``ngram - 1`` tokens."""

    chains: int
    ngram: int
    tokens_per_forward: float
    source: str = ""


@dataclass(frozen=True)
class SuffixPoint:
    """Measured tokens that ``topk`` suffixes of ``ngram - 1`` tokens added per fully accepted trunk."""

    topk: int
    ngram: int
    tokens_per_full_trunk: float
    source: str = ""


def _run_entries(path: Path, method: str) -> list[tuple[str, dict, list[dict]]]:
    """(key, config, per-prompt stats) of the entries ``method`` or ``method[...]`` of a benchmark run JSON."""
    rows = []
    for key, entry in (json.loads(path.read_text()).get("per_method") or {}).items():
        if key == method or key.startswith(method + "["):
            stats = [p["stats"] for p in entry.get("per_prompt", []) if "stats" in p]
            if stats:
                rows.append((key, stats[0]["config"], stats))
    return rows


def yield_points(path: str | Path, method: str) -> list[YieldPoint]:
    """Tokens per draft forward (drafted / forwards over all prompts) of every W = 0, G >= 1 entry of ``method``."""
    out = []
    for key, cfg, stats in _run_entries(Path(path), method):
        forwards = sum(s["draft_forwards"] for s in stats)
        if cfg.get("window", 0) == 0 and cfg["guess_set"] >= 1 and forwards:
            out.append(YieldPoint(cfg["guess_set"], cfg["ngram"], sum(s["draft_tokens"] for s in stats) / forwards,
                                  f"{Path(path).name}:{key}"))
    return out


def suffix_points(path: str | Path, method: str, full_fraction: float) -> list[SuffixPoint]:
    """Suffix tokens per fully accepted trunk of every K >= 1 entry of ``method``: its branch tokens per cycle /
    ``full_fraction`` (the share of cycles that accept their whole trunk, taken from the traces)."""
    if not 0 < full_fraction <= 1:
        raise ValueError(f"full_fraction must be in (0, 1], got {full_fraction!r}")
    out = []
    for key, cfg, stats in _run_entries(Path(path), method):
        cycles = sum(s["cycles"] for s in stats)
        if cfg.get("topk", 0) >= 1 and cycles:
            per_cycle = sum(s["branch_accepted"] for s in stats) / cycles
            out.append(SuffixPoint(cfg["topk"], cfg["ngram"], per_cycle / full_fraction, f"{Path(path).name}:{key}"))
    return out


def fit_yield(points: Sequence[YieldPoint], chain_decay: float) -> tuple[float, float]:
    """(a, r) of ``y = 1 + a (1 - r^C)/(1 - r) s_b(N)`` with b = ``chain_decay``: least squares (r on a 0.005 grid
    over 0..0.95, a in closed form)."""
    if not points:
        raise ValueError("fit_yield needs at least one point")
    probe = AcceptanceModel(0.0, 1.0, 0.0, chain_decay, 0.0)               # only its chain_scale is used
    best = None
    for r in (i * 0.005 for i in range(191)):
        f = [_geometric_sum(p.chains, r) * probe.chain_scale(p.ngram) for p in points]
        a = sum(fi * (p.tokens_per_forward - 1) for fi, p in zip(f, points)) / sum(fi * fi for fi in f)
        err = sum((1 + a * fi - p.tokens_per_forward) ** 2 for fi, p in zip(f, points))
        if best is None or err < best[0] - 1e-15:
            best = (err, round(a, 4), round(r, 3))
    return best[1], best[2]


def fit_suffix(points: Sequence[SuffixPoint], yield_decay: float, chain_decay: float) -> float:
    """c of ``suffix(K, N) = c (1 - r^K)/(1 - r) s_b(N)`` by least squares (r and b given)."""
    if not points:
        raise ValueError("fit_suffix needs at least one point")
    probe = AcceptanceModel(0.0, 0.0, yield_decay, chain_decay, 1.0)        # only its chain_scale is used
    f = [_geometric_sum(p.topk, yield_decay) * probe.chain_scale(p.ngram) for p in points]
    return round(sum(fi * p.tokens_per_full_trunk for fi, p in zip(f, points)) / sum(fi * fi for fi in f), 4)


def fit_acceptance(traces_path: str | Path, method: str, run_paths: Sequence[str | Path], *, chain_decay: float,
                   label: str = "") -> AcceptanceModel:
    """An :class:`AcceptanceModel` for ``method`` ("ouroboros": a fresh pool per call; "ouroboros_warm": the pool
    kept across prompts): alpha_head and alpha from the traces; a and r from the W = 0 entries of ``run_paths``
    with b = ``chain_decay`` (:func:`fit_chain_decay`); c from the traces' suffix runs when they verified suffixes,
    else from the K >= 1 entries (branch tokens per cycle / the traces' share of fully accepted trunks)."""
    cycles, params = load_trace_cycles(traces_path, method)
    alpha_head, alpha = fit_trunk_alpha(cycles, 1, HEAD_TOKENS), fit_trunk_alpha(cycles, HEAD_TOKENS + 1)
    a, r = fit_yield([p for path in run_paths for p in yield_points(path, method)], chain_decay)
    drafted = [c for c in cycles if int(c["draft_len"])]
    full = [c for c in drafted if _trunk_outcome(c)[2]]
    if params.get("topk") and full:
        extra = [int(c.get("verified", c["accepted"])) - 1 - int(c["draft_len"]) for c in full]
        spoints = [SuffixPoint(params["topk"], params["ngram"], sum(extra) / len(extra), Path(traces_path).name)]
    else:
        spoints = [p for path in run_paths for p in suffix_points(path, method, len(full) / len(drafted))]
    return AcceptanceModel(round(alpha, 4), a, r, chain_decay, fit_suffix(spoints, r, chain_decay),
                           round(alpha_head, 4), HEAD_TOKENS, label or method)


# ---------------------------------------------------------------------------------------------------- prediction
def draft_layout_tokens(cfg: DecodeConfig) -> int:
    """Logical tokens of a phase's first (largest) draft forward: N + 1 pending slots + (W + G) chains of N - 1."""
    return cfg.ngram + 1 + (cfg.window + cfg.guess_set) * (cfg.ngram - 1)


def verify_tree_nodes(cfg: DecodeConfig) -> int:
    """Nodes of the fixed verification tree: root + trunk capacity + K suffixes of N - 1."""
    return 1 + cfg.max_gamma + cfg.topk * (cfg.ngram - 1)


@dataclass(frozen=True)
class Prediction:
    """The model's expectation for one layout over a generation (per-cycle numbers: means over the generation)."""

    config: DecodeConfig
    tokens_per_ms: float
    tokens_per_cycle: float
    ms_per_cycle: float
    draft_forwards_per_cycle: float
    mean_gamma: float
    draft_yield: float
    draft_tokens: int           # logical tokens of the phase's first (largest) draft forward
    verify_nodes: int

    @property
    def draft_bucket(self) -> int:
        return bucket(self.draft_tokens)

    @property
    def verify_bucket(self) -> int:
        return bucket(self.verify_nodes)

    def as_dict(self) -> dict:
        return {"config": self.config.as_dict(), "tokens_per_ms": round(self.tokens_per_ms, 5),
                "tok_s": round(self.tokens_per_ms * 1e3, 1), "tokens_per_cycle": round(self.tokens_per_cycle, 3),
                "ms_per_cycle": round(self.ms_per_cycle, 3),
                "draft_forwards_per_cycle": round(self.draft_forwards_per_cycle, 3),
                "mean_gamma": round(self.mean_gamma, 2), "draft_yield": round(self.draft_yield, 3),
                "draft_tokens": self.draft_tokens, "draft_bucket": self.draft_bucket,
                "verify_nodes": self.verify_nodes, "verify_bucket": self.verify_bucket}


_CHAINS: dict[tuple, list[list[float]]] = {}


def _gamma_rows(full: tuple[float, ...], gamma: int, adaptive: bool, upto: int) -> list[list[float]]:
    """The distribution of the draft length g over 1..cap for cycles 0..upto-1 (cap = len(full); ``full[g-1]``: the
    chance a g-token trunk is accepted whole), from g = gamma: +2 after a full trunk, -1 otherwise (adaptive), or
    fixed. Cached per chain, extended on demand."""
    if len(_CHAINS) > 4096:
        _CHAINS.clear()
    cap = len(full)
    rows = _CHAINS.get((full, gamma, adaptive))
    if rows is None:
        rows = _CHAINS[full, gamma, adaptive] = [[float(g == min(gamma, cap) - 1) for g in range(cap)]]
    while len(rows) < upto:
        p = rows[-1]
        nxt = p if not adaptive else [0.0] * cap
        if adaptive:
            for g, pg in enumerate(p):
                if pg:
                    nxt[min(g + 2, cap - 1)] += pg * full[g]
                    nxt[max(g - 1, 0)] += pg * (1.0 - full[g])
        rows.append(nxt)
    return rows


def _dot(a: Sequence[float], b: Sequence[float]) -> float:
    return sum(map(operator.mul, a, b))


def predict(cfg: DecodeConfig, costs: StepCosts, acceptance: AcceptanceModel, *, new_tokens: int = 256) -> Prediction:
    """The model's tokens/ms for ``cfg`` on the device path (the module docstring) over ``new_tokens`` tokens.

    W + G = 0 is modelled as speculative drafting (one token per forward). ValueError for trees outside the
    step costs' measured buckets."""
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
    chains, cap = cfg.window + cfg.guess_set, cfg.max_gamma
    y = acceptance.draft_yield(chains, cfg.ngram)
    first, rest = costs.draft_ms(draft_layout_tokens(cfg)), costs.draft_ms(1 + chains * (cfg.ngram - 1))
    nodes = verify_tree_nodes(cfg)
    fixed = costs.target_ms(nodes) + costs.per_cycle_ms
    suffix = acceptance.suffix_tokens(cfg.topk, cfg.ngram)
    reach = acceptance.trunk_reach(cap)                  # reach[g-1]: the first g trunk tokens all accepted
    tokens, ms, forwards, trunk = [], [], [], 0.0
    for g in range(1, cap + 1):
        trunk += reach[g - 1]
        f = max(1.0, min(g, g / y + 0.5))                # ceil(g / y) at a yield that varies: its mean
        tokens.append(trunk + 1.0 + reach[g - 1] * suffix)
        forwards.append(f)
        ms.append(first + (f - 1) * rest + f * costs.per_forward_ms + fixed)
    occupancy, done, cycles, upto = [0.0] * cap, 0.0, 0.0, 64     # occupancy: expected cycles spent at each g
    rows = _gamma_rows(tuple(reach), cfg.gamma, cfg.adaptive, upto)
    c = 0
    while done < new_tokens:
        if c == len(rows):
            upto *= 2
            rows = _gamma_rows(tuple(reach), cfg.gamma, cfg.adaptive, upto)
        t = _dot(rows[c], tokens)
        w = min(1.0, (new_tokens - done) / t)            # the last cycle counts for the tokens still missing
        occupancy = [o + w * p for o, p in zip(occupancy, rows[c])]
        done, cycles, c = done + t, cycles + w, c + 1
    total_ms = _dot(occupancy, ms)
    return Prediction(cfg, new_tokens / total_ms, new_tokens / cycles, total_ms / cycles,
                      _dot(occupancy, forwards) / cycles, _dot(occupancy, range(1, cap + 1)) / cycles, y,
                      draft_layout_tokens(cfg), nodes)


# -------------------------------------------------------------------------------------------------------- choice
@dataclass(frozen=True)
class SearchSpace:
    """The layouts :func:`choose_layout` tries: every combination, W = 0 and G = ``chains`` (the model cannot tell
    W from G, and G is the measured kind), skipping those whose first draft forward exceeds ``max_draft_tokens``
    or whose verification tree's bucket exceeds ``max_verify_bucket`` (the largest measured)."""

    gammas: tuple[int, ...] = tuple(range(1, 17))
    ngrams: tuple[int, ...] = tuple(range(3, 9))
    chains: tuple[int, ...] = tuple(range(1, 9))
    topks: tuple[int, ...] = tuple(range(0, 7))
    adaptive: tuple[bool, ...] = (True,)
    max_draft_tokens: int = 64
    max_verify_bucket: int = 128

    def layouts(self) -> list[DecodeConfig]:
        cfgs = (DecodeConfig(gamma=gamma, ngram=n, window=0, guess_set=c, topk=k, adaptive=adaptive)
                for gamma, n, c, k, adaptive in product(self.gammas, self.ngrams, self.chains, self.topks,
                                                        self.adaptive))
        return [cfg for cfg in cfgs if draft_layout_tokens(cfg) <= self.max_draft_tokens
                and bucket(verify_tree_nodes(cfg)) <= self.max_verify_bucket]


@dataclass(frozen=True)
class Candidate:
    """A layout's tokens/ms (the mean over the acceptance models) and each model's prediction."""

    config: DecodeConfig
    tokens_per_ms: float
    predictions: tuple[Prediction, ...]
    labels: tuple[str, ...]

    def as_dict(self) -> dict:
        first = self.predictions[0]
        return {"config": self.config.as_dict(), "tokens_per_ms": round(self.tokens_per_ms, 5),
                "tok_s": round(self.tokens_per_ms * 1e3, 1), "draft_tokens": first.draft_tokens,
                "draft_bucket": first.draft_bucket, "verify_nodes": first.verify_nodes,
                "verify_bucket": first.verify_bucket,
                "per_model": {label: p.as_dict() for label, p in zip(self.labels, self.predictions)}}


def _tie_key(c: Candidate) -> tuple:
    """Smaller buckets first (draft forward, then verification tree), then the better prediction."""
    return c.predictions[0].draft_bucket, c.predictions[0].verify_bucket, -c.tokens_per_ms


def choose_layout(costs: StepCosts, acceptance: AcceptanceModel | Sequence[AcceptanceModel],
                  space: SearchSpace | None = None, *, new_tokens: int = 256, tolerance: float = 0.01,
                  top: int = 10) -> tuple[DecodeConfig, float, list[Candidate]]:
    """The layout of ``space`` with the most tokens/ms (mean over the ``acceptance`` models), its tokens/ms, and
    the ``top`` candidates, best first.

    Layouts within ``tolerance`` (relative) of the best are ties the model cannot resolve: among them the smallest
    buckets win (draft forward, then verification tree), then the best prediction, so a nearly flat cost curve over
    T does not push the choice into the largest trees."""
    models = (acceptance,) if isinstance(acceptance, AcceptanceModel) else tuple(acceptance)
    if not models:
        raise ValueError("choose_layout needs at least one acceptance model")
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance!r}")
    labels = tuple(m.label or f"model{i}" for i, m in enumerate(models))
    cands = []
    for cfg in (space or SearchSpace()).layouts():
        preds = tuple(predict(cfg, costs, m, new_tokens=new_tokens) for m in models)
        cands.append(Candidate(cfg, sum(p.tokens_per_ms for p in preds) / len(preds), preds, labels))
    if not cands:
        raise ValueError(f"no layout of {space} fits its limits")
    cands.sort(key=lambda c: -c.tokens_per_ms)
    best = cands[0].tokens_per_ms
    chosen = min((c for c in cands if c.tokens_per_ms >= (1.0 - tolerance) * best), key=_tie_key)
    return chosen.config, chosen.tokens_per_ms, cands[:top]


def predict_replay(costs: StepCosts, record: dict, draft_step_ms: float, per_cycle_ms: float) -> dict:
    """What ``costs`` predict for a replayed method of ``bench/e2e_gpu.py`` from its recorded means: per cycle
    ``mean_draft_forwards * draft_step_ms`` + target(ceil(mean tree size)) + ``per_cycle_ms``, for ``mean_accepted``
    tokens; with the replay's own numbers and the relative error of the predicted tokens/s."""
    draft = record["mean_draft_forwards"] * draft_step_ms
    verify = costs.target_ms(-int(-record["mean_tree_size"] // 1))
    ms = draft + verify + per_cycle_ms
    tok_s = record["mean_accepted"] / ms * 1e3
    split = record.get("split_seconds") or {}
    n = record["cycles"]
    return {"predicted_ms_per_cycle": {"draft": round(draft, 3), "verify": round(verify, 3),
                                       "bookkeeping": round(per_cycle_ms, 3), "total": round(ms, 3)},
            "replayed_ms_per_cycle": {**{k: round(v / n * 1e3, 3) for k, v in split.items()},
                                      "total": record["ms_per_cycle"]},
            "predicted_tok_s": round(tok_s, 2), "replayed_tok_s": record["tok_s"],
            "error": round(tok_s / record["tok_s"] - 1.0, 4)}


# ------------------------------------------------------------------------------------------ the recorded inputs
H200_RUN1 = "bench/results/gpu_h200_run1/e2e_gpu.json"
# = load_step_costs(H200_RUN1): NVIDIA H200, torch 2.11, random bf16 weights with the real pair's configs, prompt 512
# (per cycle: tree build 0.3268 + host pool insert 0.1484 + suffix replacement 0.2581 ms).
H200_UNFUSED = StepCosts(target={1: 4.3759, 16: 6.4348, 32: 6.6977, 64: 7.0145, 128: 8.0789},
                         draft={1: 2.8808, 16: 4.2986, 256: 4.9119}, per_forward_ms=3.1804, per_cycle_ms=0.7333,
                         label=f"NVIDIA H200 unfused (host verify), {H200_RUN1}")
# = load_step_costs(H200_RUN1, interface="device")
H200_DEVICE = replace(H200_UNFUSED, target={1: 4.1163, 16: 6.0138, 32: 6.1323, 64: 6.2751, 128: 6.6218},
                      label=f"NVIDIA H200 unfused (device verify), {H200_RUN1}")
# The item-1 goals (steps <= 1.3x the lean decoder, SPEC §4; issue 17): H200_DEVICE's shape over T mapped onto them,
# the whole draft step inside the draft's graph (nothing extra per forward), 0.3 ms per cycle in one graph.
ITEM1_TARGETS = H200_DEVICE.rescaled((2.6, 3.1), (1.6, 2.0), per_forward_ms=0.0, per_cycle_ms=0.3,
                                     label="item-1 targets: target 2.6 ms T=1 / 3.1 T=64, draft step 1.6 / 2.0, "
                                           "0.3 ms per cycle (H200_DEVICE's shape over T)")

# The acceptance inputs: real Qwen2.5-Coder-1.5B/0.5B pair on a CPU (float32 target, greedy, 128 new tokens; each
# file records its machine and parameters): traces for alpha (and suffixes), W = 0 runs for the yield.
SCENARIO_FILES = {
    "humaneval": ("bench/results/traces_humaneval.json",
                  ("bench/results/e2e_humaneval_float32_10x128_int8draft.json",
                   "bench/results/e2e_humaneval_float32_10x128_int8draft_g3.json",
                   "bench/results/e2e_humaneval_float32_10x128_int8draft_topk0.json",
                   "bench/results/e2e_humaneval_float32_10x128_smallm.json",
                   "bench/results/cpu_sweep_guess_set_int8draft.json")),
    "gsm8k": ("bench/results/traces_gsm8k.json",
              ("bench/results/e2e_gsm8k_float32_10x128_int8draft.json",
               "bench/results/e2e_gsm8k_float32_10x128_int8draft_topk0.json",
               "bench/results/e2e_gsm8k_float32_10x128_smallm.json")),
}
# = fit_chain_decay(both GSM8K trace methods' cycles, 4): the only traces that verified suffixes (K = 1)
CHAIN_DECAY = 0.661
# = fit_acceptance(traces, method, runs, chain_decay=CHAIN_DECAY) with (traces, runs) = SCENARIO_FILES[dataset], for
# method ouroboros (a fresh pool per call, the default) and ouroboros_warm (the pool kept across prompts)
ACCEPTANCE = {
    ("humaneval", "ouroboros"): AcceptanceModel(0.9441, 0.4583, 0.19, CHAIN_DECAY, 0.5741, 0.9227, HEAD_TOKENS,
                                                "humaneval:ouroboros"),
    ("humaneval", "ouroboros_warm"): AcceptanceModel(0.9459, 0.5885, 0.24, CHAIN_DECAY, 0.777, 0.9215, HEAD_TOKENS,
                                                     "humaneval:ouroboros_warm"),
    ("gsm8k", "ouroboros"): AcceptanceModel(0.9167, 0.5996, 0.19, CHAIN_DECAY, 0.7059, 0.8654, HEAD_TOKENS,
                                            "gsm8k:ouroboros"),
    ("gsm8k", "ouroboros_warm"): AcceptanceModel(0.9137, 0.788, 0.27, CHAIN_DECAY, 1.1625, 0.8689, HEAD_TOKENS,
                                                 "gsm8k:ouroboros_warm"),
}
GPU_SPACE = SearchSpace()
OLD_GPU_LAYOUT = DecodeConfig(gamma=12, ngram=7, window=20, guess_set=20, topk=3)


def choose_gpu_defaults(costs: StepCosts = ITEM1_TARGETS) -> tuple[DecodeConfig, float, list[Candidate]]:
    """:func:`choose_layout` on the recorded inputs: ``costs`` (the item-1 targets unless given), the four
    acceptance models (HumanEval and GSM8K, fresh and warm pool, weighted alike), :data:`GPU_SPACE`, 256 tokens.
    ``config.GPU_DEFAULTS`` is its layout for the item-1 targets."""
    return choose_layout(costs, tuple(ACCEPTANCE.values()), GPU_SPACE)
