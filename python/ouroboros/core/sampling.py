"""Lossless sampling over a token tree (SPEC §2 "Sampling (lossless)"): per-node processors and the verification walk.

Knows nothing about models: it sees a tree, the raw logits of its nodes and the token history before it.

- :class:`SamplingConfig` holds HF's sampling arguments (same names, same defaults) and :func:`logits_processor` turns
  it into HF's own processor/warper classes in HF's order, so our processed distribution is HF's by construction.
- :func:`make_sampler` resolves the arguments of ``ouroboros.generate`` (and a user ``LogitsProcessorList``) into a
  :class:`TreeSampler`, or None when plain greedy (argmax of the raw logits) is asked for.
- :meth:`TreeSampler.walk` is multi-candidate speculative sampling (SpecInfer / Sequoia) over the trie: at each
  visited node, r = softmax(processors(node's own path, raw logits)); each child x in insertion order is accepted with
  probability r(x) if it came from a deterministic proposer (q one-hot; on rejection r(x) <- 0, renormalise) or with
  min(1, r(x)/q(x)) if it was sampled from q (on rejection r <- norm(max(r - q, 0))); with no child accepted the bonus
  token is drawn from r. The emitted tokens are then distributed exactly as plain sampling from the target.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

__all__ = ["SamplingConfig", "logits_processor", "resolve_sampling", "make_sampler", "TreeSampler", "WalkResult",
           "AcceptRule", "exact_accept"]


@dataclass(frozen=True)
class SamplingConfig:
    """HF's sampling arguments, with HF's names and defaults.

    ``do_sample=False`` or ``temperature == 0`` means greedy (argmax of the processed scores); the warpers
    (temperature, top_k, top_p, min_p) then do nothing, ``repetition_penalty`` applies in both modes.
    ``top_k`` None or 0 disables top-k (as in HF).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        if not isinstance(self.do_sample, bool):
            raise ValueError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool)
                                       or self.top_k < 0):
            raise ValueError(f"top_k must be None or an int >= 0 (0 = off), got {self.top_k!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (not number(self.min_p) or not 0 <= self.min_p <= 1):
            raise ValueError(f"min_p must be None or a number in [0, 1], got {self.min_p!r}")
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty!r}")

    @property
    def greedy(self) -> bool:
        """True when the choice at a node is the argmax of the processed scores."""
        return not self.do_sample or self.temperature == 0


def _penalties(cfg: SamplingConfig) -> list:
    """The processors HF applies in both modes, before any user-supplied ones."""
    if cfg.repetition_penalty != 1.0:
        return [RepetitionPenaltyLogitsProcessor(float(cfg.repetition_penalty))]
    return []


def _warpers(cfg: SamplingConfig) -> list:
    """HF's sampling-only warpers, in ``GenerationMixin._get_logits_processor``'s order (none when greedy)."""
    if cfg.greedy:
        return []
    out: list = []
    if cfg.temperature != 1.0:
        out.append(TemperatureLogitsWarper(float(cfg.temperature)))
    if cfg.top_k:
        out.append(TopKLogitsWarper(top_k=cfg.top_k))
    if cfg.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=float(cfg.top_p)))
    if cfg.min_p is not None:
        out.append(MinPLogitsWarper(min_p=float(cfg.min_p)))
    return out


def _merge(defaults: list, custom: Sequence) -> list:
    """HF's ``_merge_criteria_processor_list``: a custom processor replaces a default of the same type in place; the
    other custom ones follow, in their order."""
    out = [next((c for c in custom if type(c) is type(d)), d) for d in defaults]
    return out + [c for c in custom if c not in out]


def logits_processor(cfg: SamplingConfig, custom: Sequence | None = None) -> LogitsProcessorList:
    """HF's processors for ``cfg`` in HF's order: repetition penalty, then ``custom`` (merged as HF merges a user's
    ``logits_processor``), then the warpers when sampling (temperature, top-k, top-p, min-p)."""
    return LogitsProcessorList(_merge(_penalties(cfg), custom or ()) + _warpers(cfg))


_SAMPLE_ONLY = {name: getattr(SamplingConfig(), name) for name in ("temperature", "top_k", "top_p", "min_p")}


def resolve_sampling(do_sample: bool | None = False, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                     custom: Sequence | None = None) -> tuple[SamplingConfig, LogitsProcessorList]:
    """The arguments of ``ouroboros.generate`` as a config and the processor list to apply per node.

    Rule for None: without ``custom`` (a user ``logits_processor``), None takes HF's default (temperature 1.0,
    top_k 50, top_p 1.0, min_p None, repetition_penalty 1.0). With ``custom`` (for example HF's fully prepared list,
    which already holds the warpers), a None argument adds nothing: only the arguments given add processors, so
    nothing is applied twice. With ``do_sample=False`` the sampling-only arguments (temperature, top_k, top_p, min_p)
    are validated, then ignored with a warning as HF does (``temperature=0`` is a plain greedy request: no warning).
    """
    do_sample = False if do_sample is None else do_sample      # HF treats an unset do_sample as False
    given = {k: v for k, v in dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                    repetition_penalty=repetition_penalty).items() if v is not None}
    SamplingConfig(do_sample=do_sample, **given)          # validate everything that was passed
    if not do_sample:
        ignored = [k for k in _SAMPLE_ONLY if k in given and given[k] != _SAMPLE_ONLY[k]
                   and not (k == "temperature" and given[k] == 0)]
        if ignored:
            warnings.warn(f"do_sample is False, so {', '.join(ignored)} only apply in sampling and are ignored; "
                          f"set do_sample=True or unset them", UserWarning, stacklevel=3)
        given = {k: v for k, v in given.items() if k not in _SAMPLE_ONLY}
    neutral = {} if custom is None else dict(temperature=1.0, top_k=None, top_p=1.0, min_p=None)
    cfg = SamplingConfig(do_sample=do_sample, **{**neutral, **given})
    return cfg, logits_processor(cfg, custom)


AcceptRule = Callable[[float, float], bool]


def exact_accept(prob: float, u: float) -> bool:
    """The lossless rule for a deterministic candidate x: accept with probability r(x), i.e. iff u < r(x)."""
    return u < prob


@dataclass
class WalkResult:
    """What :meth:`TreeSampler.walk` chose below its start node.

    ``path``: accepted nodes; ``bonus``: the token drawn (or argmax-chosen) at the last visited node; ``dist``: the
    distribution ``bonus`` was drawn from (None when greedy); ``scores``: per emitted token, (processed (1, V),
    raw (1, V)) of the node that produced it, when the sampler keeps scores; ``dists``: per emitted token, the
    processed distribution (V,) of the node before it (what the token is distributed as), when asked for.
    """

    path: list[int]
    bonus: int
    dist: torch.Tensor | None = None
    scores: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    dists: list[torch.Tensor] | None = None


@dataclass
class TreeSampler:
    """Chooses the emitted tokens of a verified tree: sampling (``do_sample``) or argmax of processed scores.

    ``processors`` run per visited node on that node's own path (context + ancestors + the node), so history-
    dependent processors see exactly the sequence plain decoding would have at that point. Draws come from
    ``generator`` or, when None, torch's global RNG (on the generator's / logits' device). ``accept`` decides a
    deterministic candidate from (r(x), u): :func:`exact_accept` is lossless; a test may pass a lossy rule.
    ``keep_scores``: the walk also returns (processed, raw) scores per emitted token.
    """

    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    do_sample: bool = False
    generator: torch.Generator | None = None
    accept: AcceptRule = exact_accept
    keep_scores: bool = False

    def for_draft(self) -> "TreeSampler":
        """A twin for a sampling draft: same processors, no scores, and its own generator stream derived from this
        one's (one draw here), so a seed reproduces both and the draft's draws are not the verifier's."""
        gen = None
        if self.generator is not None:
            seed = int(torch.randint(0, 2 ** 62, (1,), generator=self.generator, device=self.generator.device))
            gen = torch.Generator(device=self.generator.device).manual_seed(seed)
        return replace(self, generator=gen, accept=exact_accept, keep_scores=False)

    # ---- per-node pieces ---------------------------------------------------------------------------------------
    def scores(self, logits: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """Processed scores (V,) float32 of one node from its raw logits (V,) and its path ``history`` (L,) int64
        (context + ancestors + the node itself). ``logits`` is not modified."""
        scores = logits.float().clone()[None]
        if len(self.processors):
            scores = self.processors(history[None], scores)
        return scores[0]

    def _uniform(self, device: torch.device) -> float:
        dev = self.generator.device if self.generator is not None else device
        return float(torch.rand((), generator=self.generator, device=dev))

    def _draw(self, probs: torch.Tensor) -> int:
        """One token from ``probs`` (V,) (non-negative, positive sum) by inverse CDF with one uniform draw; a token
        of probability 0 is never drawn."""
        cdf = probs.double().cumsum(0)
        target = self._uniform(probs.device) * float(cdf[-1])
        return int(torch.searchsorted(cdf, torch.tensor([target], dtype=torch.float64, device=cdf.device),
                                      right=True).clamp(max=probs.shape[0] - 1))

    @staticmethod
    def _normalised(r: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
        total = float(r.sum())
        return r / total if total > 0 else fallback     # all mass removed: only by rounding (see walk)

    def _choose(self, r: torch.Tensor, children: list[tuple[int, int]],
                proposal_q: Mapping[int, torch.Tensor]) -> tuple[int | None, torch.Tensor]:
        """Speculative sampling at one node: the accepted child (or None) and the final r (V,)."""
        for node, tok in children:
            q = proposal_q.get(node)
            u = self._uniform(r.device)
            if q is None:                                       # deterministic proposer: q = one-hot(tok)
                if self.accept(float(r[tok]), u):
                    return node, r
                rest = r.clone()
                rest[tok] = 0.0
            else:                                               # sampled from q: accept with min(1, r/q)
                qx = float(q[tok])
                if qx > 0 and u < min(1.0, float(r[tok]) / qx):
                    return node, r
                rest = (r - q.to(r.dtype)).clamp_min(0.0)
            # rest sums to 0 only if the candidate held (numerically) all of r's mass and still lost to a rounding
            # draw; then keep r, whose remaining mass is that same rounding error
            r = self._normalised(rest, r)
        return None, r

    # ---- the walk ----------------------------------------------------------------------------------------------
    def walk(self, tree, logits: torch.Tensor, start: int, context: Sequence[int],
             proposal_q: Mapping[int, torch.Tensor] | None = None, keep_dists: bool = False) -> WalkResult:
        """Choose the accepted nodes below ``start`` and the bonus token.

        ``tree``: a :class:`~ouroboros.core.tokentree.TokenTree`; ``logits`` (T, V): raw logits of every node;
        ``context``: the whole token sequence up to and including ``start``'s token; ``proposal_q``: node ->
        the distribution (V,) that node's token was sampled from (nodes not in it are deterministic proposals).
        Only visited nodes are processed. Guarantees: with ``do_sample`` the emitted tokens (path tokens + bonus)
        are distributed as plain sampling from the processed target distributions; greedy: each emitted token is
        the argmax of the processed scores of the node before it. ``keep_dists`` (sampling): also return, per
        emitted token, the processed distribution it is distributed as (a sampling draft's q for each token).
        """
        proposal_q = proposal_q or {}
        history = torch.as_tensor(list(context), dtype=torch.long, device=logits.device)
        path: list[int] = []
        kept: list | None = [] if self.keep_scores else None
        dists: list | None = [] if keep_dists and self.do_sample else None
        node = start
        while True:
            raw = logits[node]
            scores = self.scores(raw, history)
            if kept is not None:
                kept.append((scores[None].clone(), raw[None].float().clone()))
            children = tree.children(node)
            if self.do_sample:
                r = torch.softmax(scores, dim=-1)
                if dists is not None:
                    dists.append(r)
                child, r = self._choose(r, children, proposal_q)
            else:
                r = None
                best = int(scores.argmax())
                child = next((n for n, tok in children if tok == best), None)
            if child is None:
                bonus = self._draw(r) if r is not None else best
                return WalkResult(path, bonus, r, kept, dists)
            path.append(child)
            node = child
            history = torch.cat([history, history.new_tensor([tree.tokens[child]])])


def make_sampler(do_sample: bool = False, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                 logits_processor: Sequence | None = None, generator: torch.Generator | None = None,
                 keep_scores: bool = False, accept: AcceptRule = exact_accept) -> TreeSampler | None:
    """The sampler for ``ouroboros.generate``'s arguments (see :func:`resolve_sampling` for None and the order), or
    None when the result is plain greedy with no processors and no scores kept: then the engine keeps its exact
    argmax-of-raw-logits path. Bad values raise ValueError naming the argument."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if logits_processor is not None and not isinstance(logits_processor, (list, tuple)):
        raise ValueError(f"logits_processor must be a LogitsProcessorList (or list) or None, got "
                         f"{type(logits_processor).__name__}")
    cfg, processors = resolve_sampling(do_sample, temperature, top_k, top_p, min_p, repetition_penalty,
                                       logits_processor)
    if cfg.greedy and not len(processors) and not keep_scores:
        return None
    return TreeSampler(processors, do_sample=not cfg.greedy, generator=generator, accept=accept,
                       keep_scores=keep_scores)
