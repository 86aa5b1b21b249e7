"""Which drafter a method drafts with (:func:`make_drafter`)."""
from __future__ import annotations

from typing import Sequence

from ouroboros.core.config import DecodeConfig
from ouroboros.core.sampling import TreeSampler
from ouroboros.drafting.base import Drafter
from ouroboros.drafting.device_drafter import DeviceDrafter
from ouroboros.drafting.gpu_pool import GpuPhrasePool
from ouroboros.drafting.host_drafter import HostDrafter
from ouroboros.drafting.pool import PhrasePool
from ouroboros.drafting.window import LookaheadWindow

__all__ = ["make_drafter"]


def make_drafter(method: str, runner, context: Sequence[int], cfg: DecodeConfig,
                 pool: PhrasePool | GpuPhrasePool | None, eos: frozenset[int],
                 sampler: TreeSampler | None = None) -> Drafter:
    """The drafter of ``method`` on ``runner`` (the drafting model's, prefilled): "speculative" drafts one token per
    forward; "ouroboros" drafts phrase by phrase with ``cfg``'s window and guesses, on the device when ``pool`` is a
    :class:`GpuPhrasePool` (then ``runner`` must be a static runner). With ``sampler`` the draft samples its tokens
    (host drafting only, no window)."""
    if method == "speculative":
        return HostDrafter(runner, eos, sampler=sampler)
    if method != "ouroboros":
        raise ValueError(f"method {method!r} has no drafting model")
    if isinstance(pool, GpuPhrasePool):
        if sampler is not None:
            raise ValueError("draft_sampling drafts on the host: use the host PhrasePool (pool_device=None)")
        return DeviceDrafter(runner, pool, cfg.ngram, cfg.window, cfg.guess_set, context, topk=cfg.topk, eos=eos)
    window = LookaheadWindow(cfg.ngram, cfg.window, context) if cfg.window else None
    return HostDrafter(runner, eos, window, pool, cfg.guess_set, cfg.topk, sampler=sampler)
