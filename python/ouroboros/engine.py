"""The Ouroboros cycle (SPEC §2) and the baselines, sharing one verify / accept / KV path.

Every method proposes a token tree, the target verifies it in one forward (``tree_step``), and the accepted path plus
the target's bonus token is emitted. Greedy: every emitted token is the target's argmax given the true prefix. With a
:class:`~ouroboros.sampling.TreeSampler` the accepted path and the bonus come from its walk (processors per node,
speculative sampling over the trie), so the output is distributed exactly as plain sampling from the target. Either
way proposals are deterministic given the text so far (or, for ``draft_sampling``, drawn from the draft's own
distribution before verification), and the pool and the Jacobi window learn only from raw argmaxes: lossless.
"""
from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import DRAFT_METHODS, DecodeConfig
from .forward import ModelRunner
from .gpu_pool import GpuPhrasePool
from .pool import PhrasePool
from .sampling import TreeSampler
from .tokentree import TokenTree

__all__ = ["GenerationStats", "StepResult", "LookaheadWindow", "Draft", "Drafter", "HostDrafter", "make_drafter",
           "tree_step", "decode"]


@dataclass
class GenerationStats:
    """What one generation did. Times are seconds of wall clock."""

    method: str = ""
    config: dict = field(default_factory=dict)
    tokens: int = 0
    cycles: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0          # draft forwards run (device drafting: with the masked ones, see Drafter)
    draft_tokens: int = 0            # tokens the draft phase produced (before truncation to gamma)
    trunk_accepted: int = 0          # draft tokens the target accepted
    branch_accepted: int = 0         # tokens accepted from concatenated phrases (suffix branches)
    guess_accepted: int = 0          # tokens the drafting model accepted from window/pool guesses
    kv_gathers: int = 0              # caches compacted by a non-contiguous gather
    pool_size: int = 0
    pool_keys: int = 0
    pool_bytes: int = 0              # pool.nbytes() after the call (bounded by its max_bytes)
    pool_lookups: int = 0
    pool_hits: int = 0
    time_total: float = 0.0
    time_prefill: float = 0.0        # putting the prompt into the caches (before the first cycle)
    time_draft: float = 0.0
    time_verify: float = 0.0
    device_cycle: bool = False       # the whole cycle ran on the device (DeviceCycle): draft and verify times are
    #                                  not split (no host sync inside a cycle); all of it is in time_total
    trace: list = field(default_factory=list, repr=False)

    @property
    def time_bookkeeping(self) -> float:
        return max(0.0, self.time_total - self.time_prefill - self.time_draft - self.time_verify)

    @property
    def accepted_per_target_forward(self) -> float:
        return self.tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def tokens_per_draft_forward(self) -> float:
        return self.draft_tokens / self.draft_forwards if self.draft_forwards else 0.0

    @property
    def pool_hit_rate(self) -> float:
        return self.pool_hits / self.pool_lookups if self.pool_lookups else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.time_total if self.time_total else 0.0

    def summary(self) -> dict:
        """Counters and derived rates as a flat JSON-ready dict (no trace)."""
        out = {k: v for k, v in self.__dict__.items() if k != "trace"}
        for name in ("time_bookkeeping", "accepted_per_target_forward", "tokens_per_draft_forward",
                     "pool_hit_rate", "tokens_per_second"):
            out[name] = getattr(self, name)
        return out


@dataclass
class StepResult:
    """One tree forward: the tree, the model's argmax at every node, and the accepted path below the given tokens.

    ``argmax`` is always the raw argmax (it feeds the pool and the window, which stay deterministic). ``bonus`` is the
    token chosen after the path by a sampler (None: the raw argmax there), ``dist`` the distribution it was drawn from
    (sampling only) and ``scores`` (processed (1, V), raw (1, V)) per emitted token when the sampler keeps them.
    """

    tree: TokenTree
    argmax: list[int]
    given: list[int]            # nodes of the tokens that were already decided (uncached prefix tail)
    trunk: list[int]            # nodes of the draft trunk
    branches: list[list[int]]   # nodes of each branch, in the order given
    path: list[int]             # accepted nodes below the last given node
    bonus: int | None = None
    dist: torch.Tensor | None = None
    scores: list | None = None

    @property
    def tip(self) -> int:
        return self.trunk[-1] if self.trunk else self.given[-1]

    @property
    def emitted(self) -> list[int]:
        """Accepted tokens plus the token chosen after them (the bonus)."""
        last = self.path[-1] if self.path else self.given[-1]
        bonus = self.argmax[last] if self.bonus is None else self.bonus
        return [self.tree.tokens[n] for n in self.path] + [bonus]

    @property
    def trunk_accepted(self) -> int:
        trunk = set(self.trunk)
        return sum(1 for n in self.path if n in trunk)


def tree_step(runner: ModelRunner, pending: Sequence[int], trunk: Sequence[int] = (),
              branches: Sequence[Sequence[int]] = (), *, sampler: TreeSampler | None = None,
              context: Sequence[int] = (), trunk_q: Sequence[torch.Tensor] = ()) -> StepResult:
    """Run ``pending`` (uncached, decided tokens), then ``trunk``, then ``branches`` off the trunk's tip, as one trie.

    Without ``sampler``: the accepted path follows the raw argmax (``TokenTree.walk``). With one: the sampler walks
    the tree on the full logits; ``context`` is then the whole sequence up to and including ``pending``'s last token
    (the processors' history) and ``trunk_q`` the distributions the trunk tokens were sampled from (empty: the trunk
    is a deterministic proposal). Guarantees: one forward; afterwards the runner's cache holds exactly the old
    prefix + pending + accepted path.
    """
    tree = TokenTree()
    given = tree.add_path(-1, pending)
    trunk_ids = tree.add_path(given[-1], trunk)
    tip = trunk_ids[-1] if trunk_ids else given[-1]
    branch_ids = [tree.add_path(tip, b) for b in branches]
    prefix = runner.n_cached
    if sampler is None:
        argmax = runner.forward_tree(tree)
        result = StepResult(tree, argmax, given, trunk_ids, branch_ids, tree.walk(given[-1], argmax))
    else:
        logits = runner.forward_tree_logits(tree)
        argmax = logits.argmax(-1).tolist()
        walk = sampler.walk(tree, logits, given[-1], context, dict(zip(trunk_ids, trunk_q)))
        result = StepResult(tree, argmax, given, trunk_ids, branch_ids, walk.path, walk.bonus, walk.dist,
                            walk.scores)
    runner.keep(prefix, given + result.path)
    return result


def initial_columns(ngram: int, width: int, context: Sequence[int], seed: int = 0) -> list[list[int]]:
    """The Jacobi window's starting state: ``width`` columns of N-1 tokens drawn from ``context`` (seeded)."""
    rng = random.Random(seed)
    return [[int(context[rng.randrange(len(context))]) for _ in range(ngram - 1)] for _ in range(width)]


class LookaheadWindow:
    """The 2-D Jacobi window: ``width`` columns of N-1 levels, each a chain hanging off the last token.

    After a forward, each column yields the n-gram (column[0]; column[1:] + prediction at its last level), which goes
    into the pool, and the column becomes that phrase (the window slides one level).
    """

    def __init__(self, ngram: int, width: int, context: Sequence[int], seed: int = 0) -> None:
        self.columns = initial_columns(ngram, width, context, seed)

    def advance(self, result: StepResult, pool: PhrasePool) -> None:
        """Slide every column using the predictions in ``result`` (whose first branches are the columns)."""
        for c, nodes in enumerate(result.branches[:len(self.columns)]):
            column = self.columns[c]
            phrase = column[1:] + [result.argmax[nodes[-1]]]
            pool.insert(column[0], phrase)
            self.columns[c] = phrase


def _clip(tokens: list[int], budget: int, eos: frozenset[int]) -> tuple[list[int], bool]:
    """At most ``budget`` tokens, cut after the first EOS; second value: generation is finished."""
    tokens = tokens[:budget]
    for i, tok in enumerate(tokens):
        if tok in eos:
            return tokens[:i + 1], True
    return tokens, len(tokens) == budget


@dataclass
class Draft:
    """What one drafting phase proposes for verification (SPEC §2 steps 1-2), and what it cost."""

    tokens: list[int]                                  # the trunk: cut to gamma, and after its first EOS
    seq: list[int]                                     # the text + every drafted token (before the cut)
    suffixes: list = field(default_factory=list)       # phrases to hang off the trunk's tip (phrase concatenation)
    forwards: int = 0                                  # draft forwards run
    drafted: int = 0                                   # tokens drafted (before the cut)
    guessed: int = 0                                   # of those, accepted window/pool guesses (the rest: 1/forward)
    qs: list = field(default_factory=list)             # sampling draft: the q (V,) each trunk token was drawn from


class Drafter(ABC):
    """Drafting (SPEC §2 step 1): the one rule every drafter follows; subclasses differ only in where it runs.

    A phase starts from the tokens the drafting model has not cached yet (``pending``; the last is the root) and the
    cycle's current ``gamma``. Each draft forward runs the pending tokens, then the W window columns and the guesses
    (up to G phrases of ``P[root]``, newest first), each a chain of N-1 tokens off the root. It accepts the longest
    chain prefix equal to the model's argmax chain (the first such chain on ties; a trie walk gives the same tokens)
    and emits it plus the argmax after it (the bonus): 1..N tokens. Every window column then yields an n-gram
    (column[0] -> column[1:] + the prediction after its last level), inserted into P in column order, and becomes
    that phrase. The cache keeps the pending tokens and the accepted chain; the bonus is the next forward's pending
    token. Forwards run while fewer than ``gamma`` tokens are drafted and none is EOS, at most ``budget(gamma)`` of
    them. The draft is the drafted tokens cut to gamma and after the first EOS; unless it holds EOS, the K newest
    phrases of ``P[its last token]`` are the suffixes to verify after it (step 2). W = G = 0 is speculative decoding's
    drafting: one token per forward.

    A host drafter (:class:`HostDrafter`) reads every forward's outcome, so it stops as soon as the rule says
    (``budget`` = gamma never binds). A device drafter (:class:`ouroboros.device_draft.DeviceDrafter`) reads once per
    phase: it runs exactly ``budget(gamma)`` forwards, and the ones after the rule says stop change nothing.
    """

    runner: ModelRunner
    eos: frozenset[int]

    def budget(self, gamma: int) -> int:
        """The most draft forwards a phase with this ``gamma`` may run."""
        return gamma

    def draft(self, x: list[int], gamma: int, forwards: int | None = None) -> Draft:
        """One drafting phase after the text ``x`` (whose first ``runner.n_cached`` tokens the drafting model has
        cached) aiming at ``gamma`` tokens, by the class's rule; ``forwards`` overrides ``budget(gamma)`` (trace
        replay). Afterwards the cache holds ``x`` and the drafted tokens but the last, or a prefix of that."""
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        forwards = self.budget(gamma) if forwards is None else forwards
        if forwards < 1:
            raise ValueError(f"a drafting phase runs at least one forward, got forwards={forwards}")
        phase = self._begin(x, gamma, forwards)
        for _ in range(forwards):
            if not self._forward(phase):       # False: the phase is over (only a host drafter can know early)
                break
        return self._end(phase)

    def _cut(self, drafted: list[int], gamma: int) -> list[int]:
        """The draft: the drafted tokens cut to ``gamma`` and after the first EOS."""
        return _clip(drafted, gamma, self.eos)[0]

    @abstractmethod
    def _begin(self, x: list[int], gamma: int, forwards: int):
        """The state of a phase after ``x`` with ``gamma`` and at most ``forwards`` forwards."""

    @abstractmethod
    def _forward(self, phase) -> bool:
        """One draft forward by the rule; False once the phase is known to be over."""

    @abstractmethod
    def _end(self, phase) -> Draft:
        """The phase's draft (cut), suffixes and counts; the runner's host state made current."""


@dataclass
class _HostPhase:
    start: int                                          # len(x)
    gamma: int
    out: Draft


class HostDrafter(Drafter):
    """The rule on a runner driven from the host (:class:`ModelRunner`, or a static runner's host interface) with a
    :class:`PhrasePool`: the chains go into one trie (shared prefixes merged, absent guesses left out), so the tree
    is no larger than it must be, which is what a CPU forward pays for.

    ``sampler`` (a sampling draft, speculative only): each forward's token is drawn from the draft's processed
    distribution instead of its argmax; the q it was drawn from is kept per draft token.
    """

    def __init__(self, runner: ModelRunner, eos: frozenset[int], window: LookaheadWindow | None = None,
                 pool: PhrasePool | None = None, guess_set: int = 0, topk: int = 0,
                 sampler: TreeSampler | None = None) -> None:
        if sampler is not None and (window is not None or guess_set):
            raise ValueError("a sampling draft drafts one token per forward: no window or guesses")
        if pool is None and (window is not None or guess_set or topk):
            raise ValueError("a window, guesses or suffixes need a phrase pool")
        self.runner, self.eos, self.window, self.pool = runner, eos, window, pool
        self.guess_set, self.topk, self.sampler = guess_set, topk, sampler

    def _begin(self, x: list[int], gamma: int, forwards: int) -> _HostPhase:
        return _HostPhase(len(x), gamma, Draft([], list(x)))

    def _forward(self, phase: _HostPhase) -> bool:
        out, seq = phase.out, phase.out.seq
        pending = seq[self.runner.n_cached:]
        guesses = self.pool.lookup(pending[-1], self.guess_set) if self.guess_set else []
        columns = self.window.columns if self.window is not None else []
        result = tree_step(self.runner, pending, branches=[*columns, *guesses], sampler=self.sampler, context=seq)
        if self.window is not None:
            self.window.advance(result, self.pool)
        new = result.emitted
        if result.dist is not None:
            out.qs.append(result.dist)
        out.forwards += 1
        out.drafted += len(new)
        out.guessed += len(new) - 1
        seq.extend(new)
        return out.drafted < phase.gamma and not self.eos.intersection(new)

    def _end(self, phase: _HostPhase) -> Draft:
        out = phase.out
        out.tokens = self._cut(out.seq[phase.start:], phase.gamma)
        out.qs = out.qs[:len(out.tokens)]
        if self.topk and not self.eos.intersection(out.tokens):
            out.suffixes = self.pool.lookup(out.tokens[-1], self.topk)
        return out


def make_drafter(method: str, runner, context: Sequence[int], cfg: DecodeConfig,
                 pool: PhrasePool | GpuPhrasePool | None, eos: frozenset[int],
                 sampler: TreeSampler | None = None) -> Drafter:
    """The drafter of ``method`` on ``runner`` (the drafting model's, prefilled): "speculative" drafts one token per
    forward (with ``sampler``: sampled); "ouroboros" drafts phrase by phrase with ``cfg``'s window and guesses, on the
    device when ``pool`` is a :class:`GpuPhrasePool` (then ``runner`` must be a static runner)."""
    if method == "speculative":
        return HostDrafter(runner, eos, sampler=sampler)
    if method != "ouroboros":
        raise ValueError(f"method {method!r} has no drafting model")
    if isinstance(pool, GpuPhrasePool):
        from .device_draft import DeviceDrafter
        return DeviceDrafter(runner, pool, cfg.ngram, cfg.window, cfg.guess_set, context, topk=cfg.topk, eos=eos)
    window = LookaheadWindow(cfg.ngram, cfg.window, context) if cfg.window else None
    return HostDrafter(runner, eos, window, pool, cfg.guess_set, cfg.topk)


def mine_verification(pool: PhrasePool, result: StepResult, draft: Sequence[int],
                      suffixes: Sequence[Sequence[int]]) -> None:
    """Phrases from verification (SPEC §2 step 4): (a) the target's argmax runs after rejected draft positions;
    (b) every verified suffix rewritten as the target's own predictions, replacing it in place. One batch each."""
    n = pool.phrase_len
    argmax, trunk = result.argmax, result.trunk
    accepted = result.trunk_accepted
    if accepted < len(draft):
        pool.insert_many((draft[j], [argmax[trunk[j + i]] for i in range(n)])
                         for j in range(accepted, len(draft) - n + 1))
    key = result.tree.tokens[result.tip]
    pool.replace_many((key, suffix, [argmax[result.tip]] + [argmax[node] for node in nodes[:n - 1]])
                      for suffix, nodes in zip(suffixes, result.branches))


def _common_prefix(a: Sequence[int], b: Sequence[int], start: int) -> int:
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


def make_runner(model, fast: bool, max_len: int, reuse: bool = True, compile: bool | None = None):
    """The dynamic-cache runner, or the static-cache one (fast path) holding at least ``max_len`` tokens.

    A static runner is kept on the model and reused by later calls (its CUDA graphs too) while it is large enough
    and the model's device, dtype and ``compile`` setting are unchanged; it starts each call empty.
    """
    if not fast:
        return ModelRunner(model)
    from .static import BUCKETS, StaticRunner
    runner = getattr(model, "_ouroboros_static_runner", None) if reuse else None
    if runner is None or not runner.fits(max_len + BUCKETS[-1], compile):
        runner = StaticRunner(model, max(max_len + BUCKETS[-1], 4096), compile=compile)
        if reuse:
            model._ouroboros_static_runner = runner
    runner.reset()
    return runner


def _pool_stats(stats: GenerationStats, pool, lookups0: int, hits0: int) -> None:
    """The pool's size after the call, and the lookups and hits since the counts ``lookups0``/``hits0``."""
    stats.pool_size, stats.pool_keys, stats.pool_bytes = len(pool), pool.num_keys(), pool.nbytes()
    stats.pool_lookups, stats.pool_hits = pool.stats.lookups - lookups0, pool.stats.hits - hits0


def _device_cycle(tgt, drf, pool: GpuPhrasePool, cfg: DecodeConfig, eos: frozenset[int], prompt: list[int],
                  max_new_tokens: int, stats: GenerationStats, t0: float) -> Iterator[list[int]]:
    """Greedy ouroboros as :class:`ouroboros.device_cycle.DeviceCycle` cycles (kept on the target's runner, with
    its captured graphs, for later calls with the same runners, settings and pool layout)."""
    from .device_cycle import DeviceCycle
    cycle = getattr(tgt, "_device_cycle", None)
    if cycle is None or not cycle.fits(tgt, drf, pool, cfg, eos):
        cycle = tgt._device_cycle = DeviceCycle(tgt, drf, pool, cfg, eos)
    lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    stats.device_cycle = True
    yield from cycle.generate(prompt, max_new_tokens, stats, pool=pool)
    _pool_stats(stats, pool, lookups0, hits0)
    stats.time_total = time.perf_counter() - t0


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
    draft_sampler = None
    if draft_sampling:
        if method != "speculative":
            raise ValueError(f"draft_sampling=True needs method='speculative', got method={method!r}")
        if sampler is not None and sampler.do_sample:
            draft_sampler = sampler.for_draft()
    t0 = time.perf_counter()
    x = [int(t) for t in prompt]
    max_len = len(x) + max_new_tokens + cfg.max_gamma + cfg.ngram
    device_pool = pool if isinstance(pool, GpuPhrasePool) else None
    if device_pool is not None:
        pool = device_pool.host
    tgt = make_runner(target, fast, max_len, compile=compile)
    drafter = drf = None
    if method in DRAFT_METHODS:
        on_device = method == "ouroboros" and device_pool is not None and cfg.window + cfg.guess_set > 0
        drf = make_runner(draft, fast or on_device, max_len + 2 * cfg.max_gamma * cfg.ngram, reuse=draft is not target,
                          compile=compile)
        if on_device and fast and sampler is None and scores_out is None:     # the whole cycle on the device
            yield from _device_cycle(tgt, drf, device_pool, cfg, eos, x, max_new_tokens, stats, t0)
            return
    tgt.prefill(x[:-1])
    if drf is not None:
        drf.prefill(x[:-1])
        drafter = make_drafter(method, drf, x, cfg, device_pool if on_device else pool, eos, draft_sampler)
    window = LookaheadWindow(cfg.ngram, cfg.window, x) if method == "lookahead" else None
    if pool is not None:
        pool.seed_from(x)
        lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    stats.time_prefill = tgt.forward_time + (drf.forward_time if drf else 0.0)
    produced, done, gamma = 0, False, cfg.gamma
    while not done:
        d0, v0 = (drf.forward_time if drf else 0.0), tgt.forward_time
        cycle_gamma = gamma
        if method == "lookahead":      # step 1 on the target itself: its own forward verifies the guesses
            guesses = pool.lookup(x[-1], cfg.guess_set)
            result = tree_step(tgt, x[tgt.n_cached:], branches=[*window.columns, *guesses], sampler=sampler,
                               context=x)
            window.advance(result, pool)
            stats.guess_accepted += len(result.path)
            drafted = Draft([], x)
        else:
            drafted = propose(method, x, drafter, pool, cfg, gamma)
            stats.draft_forwards += drafted.forwards
            stats.draft_tokens += drafted.drafted
            stats.guess_accepted += drafted.guessed
            result = tree_step(tgt, x[tgt.n_cached:], trunk=drafted.tokens, branches=drafted.suffixes,
                               sampler=sampler, context=x, trunk_q=drafted.qs)
            if cfg.adaptive and drafted.tokens:     # longer drafts while they are accepted, shorter once they are not
                full = result.trunk_accepted == len(drafted.tokens)
                gamma = min(gamma + 2, cfg.max_gamma) if full else max(gamma - 1, 1)
            if method == "ouroboros":
                mine_verification(pool, result, drafted.tokens, drafted.suffixes)
        stats.target_forwards += 1
        stats.trunk_accepted += result.trunk_accepted
        stats.branch_accepted += len(result.path) - result.trunk_accepted if method != "lookahead" else 0
        new, done = _clip(result.emitted, max_new_tokens - produced, eos)
        if scores_out is not None and result.scores is not None:
            scores_out.extend(result.scores[:len(new)])
        old_len = len(x)
        x.extend(new)
        produced += len(new)
        if drf is not None:             # roll the draft cache back to what agrees with the accepted text
            drf.rollback(min(_common_prefix(drafted.seq, x, old_len - 1), len(x) - 1))
        if pool is not None:            # the emitted text's own n-grams (prompt-lookup style)
            n = cfg.ngram
            pool.insert_many((x[i], x[i + 1:i + n]) for i in range(max(0, old_len - n + 1), len(x) - n + 1))
        stats.cycles += 1
        stats.tokens = produced
        stats.time_draft += (drf.forward_time - d0) if drf else 0.0
        stats.time_verify += tgt.forward_time - v0
        stats.trace.append({"tree_size": len(result.tree), "accepted": len(new), "verified": len(result.emitted),
                            "draft_len": len(drafted.tokens), "gamma": cycle_gamma if drf else 0,
                            "draft_forwards": drafted.forwards})
        stats.time_total = time.perf_counter() - t0
        yield new
    stats.kv_gathers = tgt.gathers + (drf.gathers if drf else 0)
    if pool is not None:
        _pool_stats(stats, pool, lookups0, hits0)
    stats.time_total = time.perf_counter() - t0
