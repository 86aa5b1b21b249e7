"""The cost model of the device cycle, and the layout (gamma, N, W, G, K) it chooses (issue 17 item 4).

**One cycle** of the device path (:mod:`ouroboros.drafting.device_drafter`) for a
:class:`~ouroboros.core.config.DecodeConfig`, with C = W + G chains and this cycle's draft length g:

- draft phase: ``F(g) = ceil(g / y)`` forwards (the drafter's budget; y = tokens per draft forward; the model uses
  its mean over a varying yield, ``g / y + 1/2``, at least 1, at most g). The first forward carries N + 1 pending
  slots, the others 1, each followed by C chains of N - 1 tokens, padded to a bucket of ``core.buckets.BUCKETS``:
  ``draft(N + 1 + C(N-1)) + (F - 1) draft(1 + C(N-1)) + F per_forward_ms``;
- verification: one fixed tree of ``1 + gamma_cap + K(N-1)`` nodes (gamma_cap = 4 gamma when adaptive, else
  gamma) in its bucket, ``target(nodes)``, plus ``per_cycle_ms`` of bookkeeping;
- tokens: the accepted trunk, the bonus token, and what the K suffixes add when the whole trunk is accepted:
  ``sum_{i<=g} P(first i accepted) + 1 + P(first g accepted) suffix(K, N)``;
- adaptive gamma (HF's rule): g -> min(g + 2, cap) after a fully accepted trunk, else max(g - 1, 1), from g = gamma.
  The distribution of g is carried cycle by cycle over a generation of ``new_tokens`` tokens, and
  tokens/ms = new_tokens / its expected ms (decode only, no prefill).

Step costs: :mod:`ouroboros.tuning.step_costs`; acceptance: :mod:`ouroboros.tuning.acceptance`; what is measured and
what is extrapolated: the :mod:`ouroboros.tuning` docstring.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import product
from typing import Sequence

from ouroboros.core.config import DecodeConfig
from ouroboros.tuning.acceptance import AcceptanceModel
from ouroboros.tuning.step_costs import StepCosts, bucket

__all__ = ["draft_layout_tokens", "verify_tree_nodes", "Prediction", "predict", "SearchSpace", "Candidate",
           "choose_layout", "predict_replay"]


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
        """The bucket the phase's first draft forward runs in."""
        return bucket(self.draft_tokens)

    @property
    def verify_bucket(self) -> int:
        """The bucket the verification tree runs in."""
        return bucket(self.verify_nodes)

    def as_dict(self) -> dict:
        """A JSON-ready summary (rounded), buckets included."""
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
    """sum(a[i] * b[i]) over the shorter of the two."""
    return sum(map(operator.mul, a, b))


def predict(cfg: DecodeConfig, costs: StepCosts, acceptance: AcceptanceModel, *, new_tokens: int = 256) -> Prediction:
    """The model's tokens/ms for ``cfg`` on the device path (the module docstring) over ``new_tokens`` tokens.

    W + G = 0 is modelled as speculative drafting (one token per forward). Deterministic (equal inputs give an equal
    Prediction). ValueError for ``new_tokens < 1`` and for forwards outside the step costs' measured buckets."""
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
        """Every layout of the space within its limits, in ``product`` order (gamma slowest, adaptive fastest)."""
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
        """A JSON-ready summary: the mean rate, the first model's layout numbers, and every model's prediction."""
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
    T does not push the choice into the largest trees. ValueError without models, for a tolerance outside [0, 1)
    and for a space with no layout within its limits."""
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
