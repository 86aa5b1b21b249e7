"""Acceptance of the cost model: how many tokens a cycle yields, and the fits that give its parameters.

**Acceptance** (:class:`AcceptanceModel`, fitted by :func:`fit_acceptance` on the real-pair CPU runs): a trunk token
is accepted with probability ``alpha_head`` at the first HEAD_TOKENS positions and ``alpha`` after them
(censored-geometric MLEs over the traced cycles: the traces reject the first two tokens about 1.5x as often); tokens
per draft forward ``y(C, N) = 1 + a (1 - r^C)/(1 - r) s(N)`` (each further chain, a newest-first pool phrase, adds r
times what the one before added; ``s(N) = (1 - b^(N-1)) / (1 - b^3)`` scales the accepted chain length from N = 4
with b, the chance an accepted phrase token is followed by another: the MLE over the suffix runs the GSM8K traces
accepted); ``suffix(K, N) = min(N - 1, c (1 - r^K)/(1 - r) s(N))``. What is measured and what is extrapolated: the
:mod:`ouroboros.tuning` docstring.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["HEAD_TOKENS", "AcceptanceModel", "YieldPoint", "SuffixPoint", "load_trace_cycles", "fit_trunk_alpha",
           "fit_chain_decay", "yield_points", "suffix_points", "fit_yield", "fit_suffix", "fit_acceptance"]

HEAD_TOKENS = 2     # trunk positions with their own acceptance (the traces reject them about 1.5x as often)


def _geometric_sum(n: int, r: float) -> float:
    """1 + r + ... + r^(n-1)."""
    return float(n) if r == 1.0 else (1.0 - r ** n) / (1.0 - r)


@dataclass(frozen=True)
class AcceptanceModel:
    """How many tokens a cycle yields (the formulas: the module docstring).

    alpha: per-token trunk acceptance after the first ``head`` positions, which accept with ``alpha_head`` (None:
    alpha); yield_first (a): tokens the first chain adds per draft forward at N = 4; yield_decay (r): each further
    chain adds r times the one before (so does each further suffix); chain_decay (b): the chance an accepted phrase
    token is followed by another (the N dependence); suffix_first (c): tokens one suffix adds after a fully accepted
    trunk at N = 4. Construction guarantees alpha, alpha_head, r, b in [0, 1), a, c >= 0 (ValueError otherwise).
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
        """``[P(the first g trunk tokens are all accepted) for g in 1..cap]``: non-increasing, each in [0, 1]."""
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
        """Every field, JSON-ready; :meth:`from_dict` reads it back."""
        return {"label": self.label, "alpha": self.alpha, "alpha_head": self.alpha_head, "head": self.head,
                "yield_first": self.yield_first, "yield_decay": self.yield_decay, "chain_decay": self.chain_decay,
                "suffix_first": self.suffix_first}

    @classmethod
    def from_dict(cls, data: Mapping) -> AcceptanceModel:
        """The inverse of :meth:`as_dict`: ``from_dict(m.as_dict()) == m``; a field ``data`` leaves out takes its
        default (ValueError from the checks above on a bad value, TypeError on a missing required field)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def load_trace_cycles(path: str | Path, method: str) -> tuple[list[dict], dict]:
    """The cycles of ``method`` in a real-models traces file (as ``bench/e2e.py`` writes them), all prompts' in order,
    and its resolved parameters (``{}`` when it has none). ValueError when the file has no such method."""
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
    over 0..0.95, a in closed form), a rounded to 4 decimals, r to 3; the smallest r wins a tie. ValueError without
    points."""
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
    """c of ``suffix(K, N) = c (1 - r^K)/(1 - r) s_b(N)`` by least squares (r and b given), rounded to 4 decimals.
    ValueError without points."""
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
    else from the K >= 1 entries (branch tokens per cycle / the traces' share of fully accepted trunks). Pure in its
    files: the same files give the same (equal) model."""
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
