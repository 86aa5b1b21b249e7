"""The host loop: the Ouroboros cycle (SPEC §2) and the baselines, sharing one verify / accept / KV path.

Every method proposes a token tree, the target verifies it in one forward (:func:`~ouroboros.hf.tree_step.tree_step`),
and the accepted path plus the target's bonus token is emitted. Greedy: every emitted token is the target's argmax
given the true prefix. With a :class:`~ouroboros.core.sampling.TreeSampler` the accepted path and the bonus come from
its walk (processors per node, speculative sampling over the trie), so the output is distributed exactly as plain
sampling from the target. Either way proposals are deterministic given the text so far (or, for ``draft_sampling``,
drawn from the draft's own distribution before verification), and the pool and the Jacobi window learn only from raw
argmaxes: lossless.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

from ouroboros.core.config import DRAFT_METHODS, DecodeConfig
from ouroboros.core.sampling import TreeSampler
from ouroboros.core.stops import clip_at_stop
from ouroboros.decoding.device_cycle import DeviceCycle
from ouroboros.decoding.recycle import Recycler
from ouroboros.decoding.stats import GenerationStats, record_pool_stats
from ouroboros.decoding.verify import mine_verification
from ouroboros.drafting.base import Draft, Drafter
from ouroboros.drafting.contexts import context_phrases
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.model_free import ORDERS, ModelFreeGate, pooled_chain, remember
from ouroboros.drafting.pool import PhrasePool
from ouroboros.drafting.select import make_drafter
from ouroboros.drafting.window import LookaheadWindow
from ouroboros.hf.runners import make_runner
from ouroboros.hf.tree_step import StepResult, tree_step

__all__ = ["decode", "decode_on", "draft_sampler_for", "propose", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int], start: int) -> int:
    """The length of the common prefix of ``a`` and ``b``, given that their first ``start`` tokens agree."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def propose(method: str, x: list[int], drafter: Drafter | None, pool: PhrasePool | None, cfg: DecodeConfig,
            gamma: int) -> Draft:
    """Steps 1-2 of a cycle: the drafter's phase with the current ``gamma``, or, without a drafting model, no trunk
    (prompt lookup: the pool's phrases for the last token as suffixes)."""
    if drafter is not None:
        return drafter.draft(x, gamma)
    suffixes = pool.lookup(x[-1], cfg.topk) if method == "prompt_lookup" and cfg.topk else []
    return Draft([], x, suffixes)


def _device_cycle(tgt, drf, pool: GpuPhrasePool, cfg: DecodeConfig, eos: frozenset[int], prompt: list[int],
                  max_new_tokens: int, stats: GenerationStats, t0: float) -> Iterator[list[int]]:
    """Greedy ouroboros as :class:`~ouroboros.decoding.device_cycle.DeviceCycle` cycles (kept on the target's
    runner, with its captured graphs, for later calls with the same runners, settings and pool layout)."""
    cycle = getattr(tgt, "_device_cycle", None)
    if cycle is None or not cycle.fits(tgt, drf, pool, cfg, eos):
        cycle = tgt._device_cycle = DeviceCycle(tgt, drf, pool, cfg, eos)
    lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    stats.device_cycle = True
    yield from cycle.generate(prompt, max_new_tokens, stats, pool=pool)
    record_pool_stats(stats, pool, lookups0, hits0)
    stats.time_total = time.perf_counter() - t0


@dataclass
class _Loop:
    """The state a host loop carries from cycle to cycle."""

    method: str
    cfg: DecodeConfig
    tgt: object                          # the target's runner
    drf: object | None                   # the draft model's runner (draft methods)
    drafter: Drafter | None
    window: LookaheadWindow | None       # lookahead's window on the target
    pool: PhrasePool | None
    sampler: TreeSampler | None
    gamma: int
    gate: ModelFreeGate | None = None    # model-free cycles (ouroboros with cfg.model_free > 0)
    free_probs: list[float] | None = None  # the running cycle's pooled chain probabilities (a model-free cycle)
    recycler: Recycler | None = None     # top-k recycling (ouroboros with cfg.recycle > 0)

    def _model_free(self, x: list[int]) -> Draft | None:
        """The pooled chain as this cycle's draft when the gate says it pays (no draft forward), else None."""
        chain, probs = pooled_chain(self.pool, x, self.cfg.max_gamma, self.gate.floor)
        if not self.gate.worth_it(probs):
            return None
        self.free_probs = probs
        return Draft(chain, list(x))

    def observe(self, result: StepResult, draft_seconds: float, verify_seconds: float) -> None:
        """Feed the gate this cycle's measured outcome."""
        if self.gate is None:
            return
        if self.free_probs is not None:
            self.gate.observe_free(result.trunk_accepted, self.free_probs, verify_seconds)
            self.free_probs = None
        else:
            self.gate.observe_draft(len(result.emitted), draft_seconds, verify_seconds)

    def cycle(self, x: list[int], stats: GenerationStats) -> tuple[StepResult, Draft]:
        """Steps 1-4 of one cycle after the text ``x``: propose, verify in one target forward, adapt gamma, mine."""
        cfg, tgt, pool = self.cfg, self.tgt, self.pool
        if self.method == "lookahead":      # step 1 on the target itself: its own forward verifies the guesses
            guesses = pool.lookup(x[-1], cfg.guess_set)
            result = tree_step(tgt, x[tgt.n_cached:], branches=[*self.window.columns, *guesses],
                               sampler=self.sampler, context=x)
            self.window.advance(result, pool)
            stats.guess_accepted += len(result.path)
            return result, Draft([], x)
        drafted = self._model_free(x) if self.gate is not None else None
        if drafted is None:
            drafted = propose(self.method, x, self.drafter, pool, cfg, self.gamma)
        else:
            stats.model_free_cycles += 1
        stats.draft_forwards += drafted.forwards
        stats.draft_tokens += drafted.drafted
        stats.guess_accepted += drafted.guessed
        result = tree_step(tgt, x[tgt.n_cached:], trunk=drafted.tokens, branches=drafted.suffixes,
                           sampler=self.sampler, context=x, trunk_q=drafted.qs,
                           topk=self.recycler.k + 1 if self.recycler is not None else 0)
        stats.branch_accepted += len(result.path) - result.trunk_accepted
        if cfg.adaptive and drafted.forwards:   # longer drafts while they are accepted, shorter once they are not
            full = result.trunk_accepted == len(drafted.tokens)
            self.gamma = min(self.gamma + 2, cfg.max_gamma) if full else max(self.gamma - 1, 1)
        if self.method == "ouroboros":
            mine_verification(pool, result, drafted.tokens, drafted.suffixes)
        if self.recycler is not None:
            stats.recycled += self.recycler.recycle(pool, result)
        return result, drafted

    def commit(self, x: list[int], new: list[int], drafted: Draft) -> None:
        """Step 5 and history: append ``new`` to ``x``, roll the draft cache back to what agrees with the text, and
        put the emitted text's own n-grams into the pool (prompt-lookup style)."""
        old_len = len(x)
        x.extend(new)
        if self.drf is not None:
            self.drf.rollback(min(common_prefix(drafted.seq, x, old_len - 1), len(x) - 1))
        if self.pool is not None:
            orders = ORDERS if self.gate is not None else 1        # model-free chains read longer contexts too
            n = self.cfg.ngram
            self.pool.insert_many(context_phrases(x, max(0, old_len - n + 1), n - 1, orders))


def draft_sampler_for(method: str, sampler: TreeSampler | None, draft_sampling: bool) -> TreeSampler | None:
    """The draft's own sampler for ``draft_sampling`` (speculative and ouroboros), or None: the draft proposes its
    argmax."""
    if not draft_sampling:
        return None
    if method not in DRAFT_METHODS:
        raise ValueError(f"draft_sampling=True needs a draft method ({', '.join(DRAFT_METHODS)}), got {method!r}")
    return sampler.for_draft() if sampler is not None and sampler.do_sample else None


def decode(target, draft, prompt: Sequence[int], *, method: str, cfg: DecodeConfig, max_new_tokens: int,
           eos: frozenset[int], pool: PhrasePool | None, stats: GenerationStats,
           fast: bool = False, compile: bool | None = None, sampler: TreeSampler | None = None,
           draft_sampling: bool = False, scores_out: list | None = None) -> Iterator[list[int]]:
    """Yield the emitted tokens cycle by cycle until EOS or ``max_new_tokens`` (SPEC §2 "One cycle").

    ``pool`` may be a :class:`GpuPhrasePool`: then ouroboros drafts on the device (``DeviceDrafter``) and the host
    touches the pool only in batches. Either way drafting follows one rule (:class:`Drafter`) with the cycle's
    current gamma. ``sampler`` (None: plain greedy) chooses the emitted tokens at verification;
    ``draft_sampling`` (method "speculative", sampling ``sampler`` only) has the draft sample its trunk from its own
    processed distribution with its own generator stream (:meth:`TreeSampler.for_draft`). ``scores_out`` receives,
    per emitted token, (processed (1, V), raw (1, V)) when ``sampler`` keeps scores.
    """
    draft_sampler = draft_sampler_for(method, sampler, draft_sampling)
    t0 = time.perf_counter()
    x = [int(t) for t in prompt]
    max_len = len(x) + max_new_tokens + cfg.max_gamma + cfg.ngram
    device_pool = pool if isinstance(pool, GpuPhrasePool) else None
    if device_pool is not None:
        pool = device_pool.host
    tgt = make_runner(target, fast, max_len, compile=compile)
    drf = None
    on_device = method == "ouroboros" and device_pool is not None and cfg.window + cfg.guess_set > 0
    if method in DRAFT_METHODS:
        drf = make_runner(draft, fast or on_device, max_len + 2 * cfg.max_gamma * cfg.ngram, reuse=draft is not target,
                          compile=compile)
        if on_device and fast and sampler is None and scores_out is None:     # the whole cycle on the device
            yield from _device_cycle(tgt, drf, device_pool, cfg, eos, x, max_new_tokens, stats, t0)
            return
    yield from decode_on(tgt, drf, x, method=method, cfg=cfg, max_new_tokens=max_new_tokens, eos=eos, pool=pool,
                         stats=stats, draft_pool=device_pool if on_device else pool, sampler=sampler,
                         draft_sampler=draft_sampler, scores_out=scores_out, t0=t0)


def decode_on(tgt, drf, prompt: Sequence[int], *, method: str, cfg: DecodeConfig, max_new_tokens: int,
              eos: frozenset[int], pool: PhrasePool | None, stats: GenerationStats, draft_pool=None,
              sampler: TreeSampler | None = None, draft_sampler: TreeSampler | None = None,
              scores_out: list | None = None, t0: float | None = None) -> Iterator[list[int]]:
    """The host loop of :func:`decode` on given runners: ``tgt`` (the target's) and ``drf`` (the draft model's,
    draft methods; else None), both empty. ``pool`` is the host pool (or None), ``draft_pool`` the pool the drafter
    reads (a :class:`GpuPhrasePool` for device drafting; default ``pool``). Any object with the runner interface
    (``n_cached``, ``prefill``, ``forward_tree``, ``forward_tree_logits``, ``keep``, ``rollback``, ``forward_time``,
    ``gathers``) serves, so a row of a batch runs this same loop (:mod:`ouroboros.decoding.batch`)."""
    t0 = time.perf_counter() if t0 is None else t0
    x = [int(t) for t in prompt]
    tgt.prefill(x[:-1])
    drafter = None
    if drf is not None:
        drf.prefill(x[:-1])
        drafter = make_drafter(method, drf, x, cfg, pool if draft_pool is None else draft_pool, eos, draft_sampler)
    window = LookaheadWindow(cfg.ngram, cfg.window, x) if method == "lookahead" else None
    if pool is not None:
        pool.seed_from(x)
        lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    stats.time_prefill = tgt.forward_time + (drf.forward_time if drf else 0.0)
    gate = ModelFreeGate(floor=cfg.model_free) if method == "ouroboros" and cfg.model_free > 0 else None
    if gate is not None:
        remember(pool, x, 0)
    recycler = Recycler(cfg.recycle, cfg.ngram - 1) if method == "ouroboros" and cfg.recycle > 0 else None
    loop = _Loop(method, cfg, tgt, drf, drafter, window, pool, sampler, cfg.gamma, gate, recycler=recycler)
    produced, done = 0, False
    while not done:
        d0, v0, cycle_gamma = (drf.forward_time if drf else 0.0), tgt.forward_time, loop.gamma
        result, drafted = loop.cycle(x, stats)
        new, done = clip_at_stop(result.emitted, max_new_tokens - produced, eos)
        if scores_out is not None and result.scores is not None:
            scores_out.extend(result.scores[:len(new)])
        loop.commit(x, new, drafted)
        produced += len(new)
        stats.target_forwards += 1
        stats.trunk_accepted += result.trunk_accepted
        stats.cycles, stats.tokens = stats.cycles + 1, produced
        draft_dt, verify_dt = (drf.forward_time - d0) if drf else 0.0, tgt.forward_time - v0
        loop.observe(result, draft_dt, verify_dt)
        stats.time_draft += draft_dt
        stats.time_verify += verify_dt
        stats.trace.append({"tree_size": len(result.tree), "accepted": len(new), "verified": len(result.emitted),
                            "draft_len": len(drafted.tokens), "gamma": cycle_gamma if drf else 0,
                            "draft_forwards": drafted.forwards})
        stats.time_total = time.perf_counter() - t0
        yield new
    stats.kv_gathers = tgt.gathers + (drf.gathers if drf else 0)
    if pool is not None:
        record_pool_stats(stats, pool, lookups0, hits0)
    stats.time_total = time.perf_counter() - t0
