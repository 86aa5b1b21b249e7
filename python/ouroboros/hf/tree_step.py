"""One forward of a token tree on a model runner and the accepted path through it (SPEC §2 step 3).

Every method, the draft model's own drafting included, proposes a tree, runs it with :func:`tree_step` and keeps what
the model accepts. Greedy: the path follows the raw argmax. With a :class:`~ouroboros.core.sampling.TreeSampler` the
accepted path and the bonus come from its walk (processors per node, speculative sampling over the trie).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ouroboros.core.sampling import TreeSampler
from ouroboros.core.tokentree import TokenTree

__all__ = ["StepResult", "tree_step"]


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
    topk: list[list[int]] | None = None     # the raw logits' top-k tokens at every node (``tree_step(topk=k)``)
    dists: list[torch.Tensor] | None = None  # sampling, ``tree_step(dists=True)``: per emitted token, its distribution

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


def tree_step(runner, pending: Sequence[int], trunk: Sequence[int] = (),
              branches: Sequence[Sequence[int]] = (), *, sampler: TreeSampler | None = None,
              context: Sequence[int] = (), trunk_q: Sequence[torch.Tensor] = (), topk: int = 0,
              dists: bool = False) -> StepResult:
    """Run ``pending`` (uncached, decided tokens), then ``trunk``, then ``branches`` off the trunk's tip, as one trie.

    Without ``sampler``: the accepted path follows the raw argmax (``TokenTree.walk``). With one: the sampler walks
    the tree on the full logits; ``context`` is then the whole sequence up to and including ``pending``'s last token
    (the processors' history) and ``trunk_q`` the distributions the trunk tokens were sampled from (empty: the trunk
    is a deterministic proposal). ``topk`` > 0 also returns the raw logits' ``topk`` best tokens at every node
    (``StepResult.topk``, best first; the same forward); ``dists`` (with a sampling ``sampler``) the processed
    distribution each emitted token is distributed as (``StepResult.dists``). Guarantees: one forward; afterwards
    the runner's cache holds exactly the old prefix + pending + accepted path.
    """
    tree = TokenTree()
    given = tree.add_path(-1, pending)
    trunk_ids = tree.add_path(given[-1], trunk)
    tip = trunk_ids[-1] if trunk_ids else given[-1]
    branch_ids = [tree.add_path(tip, b) for b in branches]
    prefix = runner.n_cached
    if sampler is None and not topk:
        argmax = runner.forward_tree(tree)
        result = StepResult(tree, argmax, given, trunk_ids, branch_ids, tree.walk(given[-1], argmax))
    else:
        logits = runner.forward_tree_logits(tree)
        argmax = logits.argmax(-1).tolist()
        if sampler is None:
            result = StepResult(tree, argmax, given, trunk_ids, branch_ids, tree.walk(given[-1], argmax))
        else:
            walk = sampler.walk(tree, logits, given[-1], context, dict(zip(trunk_ids, trunk_q)), keep_dists=dists)
            result = StepResult(tree, argmax, given, trunk_ids, branch_ids, walk.path, walk.bonus, walk.dist,
                                walk.scores, dists=walk.dists)
    if topk:
        result.topk = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.tolist()
    runner.keep(prefix, given + result.path)
    return result
