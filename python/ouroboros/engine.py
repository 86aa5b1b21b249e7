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
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from .config import DecodeConfig
from .forward import ModelRunner
from .gpu_pool import GpuPhrasePool
from .pool import PhrasePool
from .sampling import TreeSampler
from .tokentree import TokenTree

__all__ = ["GenerationStats", "StepResult", "LookaheadWindow", "tree_step", "decode"]


@dataclass
class GenerationStats:
    """What one generation did. Times are seconds of wall clock."""

    method: str = ""
    config: dict = field(default_factory=dict)
    tokens: int = 0
    cycles: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
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


class LookaheadWindow:
    """The 2-D Jacobi window: ``width`` columns of N-1 levels, each a chain hanging off the last token.

    After a forward, each column yields the n-gram (column[0]; column[1:] + prediction at its last level), which goes
    into the pool, and the column becomes that phrase (the window slides one level).
    """

    def __init__(self, ngram: int, width: int, context: Sequence[int], seed: int = 0) -> None:
        rng = random.Random(seed)
        self.columns = [[int(context[rng.randrange(len(context))]) for _ in range(ngram - 1)] for _ in range(width)]

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


def draft_tokens(drafter: ModelRunner, seq: list[int], gamma: int, eos: frozenset[int], stats: GenerationStats,
                 window: LookaheadWindow | None = None, pool: PhrasePool | None = None,
                 guess_set: int = 0, sampler: TreeSampler | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """Extend ``seq`` (in place) by up to ``gamma`` tokens of the drafting model's text; return the draft and, with
    ``sampler`` (a sampling draft), the distribution q (V,) each draft token was drawn from (else an empty list).

    Without ``sampler`` the text is the draft's greedy text. With a window and pool this is phrase-level drafting
    (lookahead decoding on the draft model, SPEC §2 step 1): each forward verifies pool guesses and advances the
    window, adding 1..N tokens. Without, one token per forward (the only mode a sampling draft runs in).
    """
    if sampler is not None and (window is not None or guess_set):
        raise ValueError("a sampling draft drafts one token per forward: no window or guesses")
    start, qs = len(seq), []
    while len(seq) - start < gamma:
        pending = seq[drafter.n_cached:]
        guesses = pool.lookup(pending[-1], guess_set) if pool is not None and guess_set else []
        columns = window.columns if window is not None else []
        result = tree_step(drafter, pending, branches=[*columns, *guesses], sampler=sampler, context=seq)
        if window is not None:
            window.advance(result, pool)
        new = result.emitted
        if result.dist is not None:
            qs.append(result.dist)
        stats.draft_forwards += 1
        stats.draft_tokens += len(new)
        stats.guess_accepted += len(new) - 1
        seq.extend(new)
        if eos.intersection(new):
            break
    draft = _clip(seq[start:], gamma, eos)[0]
    return draft, qs[:len(draft)]


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


def propose(method: str, x: list[int], drf, drafter, window: LookaheadWindow | None, pool: PhrasePool | None,
            cfg: DecodeConfig, gamma: int, eos: frozenset[int], stats: GenerationStats,
            draft_sampler: TreeSampler | None = None) -> tuple[list[int], list, list[int], list[torch.Tensor]]:
    """Steps 1-2 of a cycle: the draft trunk, the suffixes to hang off it, the drafter's own sequence, and the
    distributions the trunk tokens were sampled from (``draft_sampler`` given; else empty: deterministic trunk)."""
    draft_seq: list[int] = []
    trunk_q: list[torch.Tensor] = []
    seq = x
    if drafter is not None:             # ouroboros drafting with the pool on the device: one read per cycle
        draft_seq, suffixes, total = drafter.draft(x[drf.n_cached:])
        draft_seq = _clip(draft_seq, cfg.gamma, eos)[0]
        seq = x + draft_seq
        stats.draft_forwards += drafter.steps
        stats.draft_tokens += total
        stats.guess_accepted += total - drafter.steps
        return draft_seq, (suffixes[:cfg.topk] if not eos.intersection(draft_seq) else []), seq, trunk_q
    if drf is not None:                 # speculative: one token per draft forward; ouroboros: phrase by phrase
        seq = list(x)
        draft_seq, trunk_q = draft_tokens(drf, seq, gamma, eos, stats, window, pool,
                                          cfg.guess_set if method == "ouroboros" else 0, draft_sampler)
    suffixes = []
    if method in ("prompt_lookup", "ouroboros") and cfg.topk and not eos.intersection(draft_seq):
        suffixes = pool.lookup(draft_seq[-1] if draft_seq else x[-1], cfg.topk)
    return draft_seq, suffixes, seq, trunk_q


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


def decode(target, draft, prompt: Sequence[int], *, method: str, cfg: DecodeConfig, max_new_tokens: int,
           eos: frozenset[int], pool: PhrasePool | None, stats: GenerationStats,
           fast: bool = False, compile: bool | None = None, sampler: TreeSampler | None = None,
           draft_sampling: bool = False, scores_out: list | None = None) -> Iterator[list[int]]:
    """Yield the emitted tokens cycle by cycle until EOS or ``max_new_tokens`` (SPEC §2 "One cycle").

    ``pool`` may be a :class:`GpuPhrasePool`: then ouroboros drafts on the device (``DeviceDrafter``) and the host
    touches the pool only in batches. ``sampler`` (None: plain greedy) chooses the emitted tokens at verification;
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
    drafter, device_pool = None, pool if isinstance(pool, GpuPhrasePool) else None
    if device_pool is not None:
        pool = device_pool.host
    tgt = make_runner(target, fast, max_len, compile=compile)
    tgt.prefill(x[:-1])
    drf = None
    if method in ("speculative", "ouroboros"):
        on_device = method == "ouroboros" and device_pool is not None and cfg.window + cfg.guess_set > 0
        drf = make_runner(draft, fast or on_device, max_len + 2 * cfg.max_gamma * cfg.ngram, reuse=draft is not target,
                          compile=compile)
        drf.prefill(x[:-1])
        if on_device:
            from .device_draft import DeviceDrafter
            drafter = DeviceDrafter(drf, device_pool, cfg.ngram, cfg.window, cfg.guess_set, cfg.gamma, x)
    window = LookaheadWindow(cfg.ngram, cfg.window, x) if method in ("lookahead", "ouroboros") else None
    if pool is not None:
        pool.seed_from(x)
        lookups0, hits0 = pool.stats.lookups, pool.stats.hits
    stats.time_prefill = tgt.forward_time + (drf.forward_time if drf else 0.0)
    produced, done, gamma = 0, False, cfg.gamma
    while not done:
        d0, v0 = (drf.forward_time if drf else 0.0), tgt.forward_time
        n_draft_fwd = stats.draft_forwards
        if method == "lookahead":      # step 1 on the target itself: its own forward verifies the guesses
            guesses = pool.lookup(x[-1], cfg.guess_set)
            result = tree_step(tgt, x[tgt.n_cached:], branches=[*window.columns, *guesses], sampler=sampler,
                               context=x)
            window.advance(result, pool)
            stats.guess_accepted += len(result.path)
            draft_seq, seq = [], x
        else:
            draft_seq, suffixes, seq, trunk_q = propose(method, x, drf, drafter, window, pool, cfg, gamma, eos,
                                                        stats, draft_sampler)
            result = tree_step(tgt, x[tgt.n_cached:], trunk=draft_seq, branches=suffixes, sampler=sampler,
                               context=x, trunk_q=trunk_q)
            if cfg.adaptive and draft_seq:      # longer drafts while they are accepted, shorter once they are not
                full = result.trunk_accepted == len(draft_seq)
                gamma = min(gamma + 2, cfg.max_gamma) if full else max(gamma - 1, 1)
            if method == "ouroboros":
                mine_verification(pool, result, draft_seq, suffixes)
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
            drf.rollback(min(_common_prefix(seq, x, old_len - 1), len(x) - 1))
        if pool is not None:            # the emitted text's own n-grams (prompt-lookup style)
            n = cfg.ngram
            pool.insert_many((x[i], x[i + 1:i + n]) for i in range(max(0, old_len - n + 1), len(x) - n + 1))
        stats.cycles += 1
        stats.tokens = produced
        stats.time_draft += (drf.forward_time - d0) if drf else 0.0
        stats.time_verify += tgt.forward_time - v0
        stats.trace.append({"tree_size": len(result.tree), "accepted": len(new), "verified": len(result.emitted),
                            "draft_len": len(draft_seq),
                            "draft_forwards": stats.draft_forwards - n_draft_fwd})
        stats.time_total = time.perf_counter() - t0
        yield new
    stats.kv_gathers = tgt.gathers + (drf.gathers if drf else 0)
    if pool is not None:
        stats.pool_size, stats.pool_keys, stats.pool_bytes = len(pool), pool.num_keys(), pool.nbytes()
        stats.pool_lookups, stats.pool_hits = pool.stats.lookups - lookups0, pool.stats.hits - hits0
    stats.time_total = time.perf_counter() - t0
