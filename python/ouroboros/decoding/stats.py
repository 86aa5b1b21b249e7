"""What one generation did: counters, times and the per-cycle trace (:class:`GenerationStats`)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["GenerationStats", "record_pool_stats", "count_cycle"]


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
    model_free_cycles: int = 0       # cycles that verified the pooled chain without drafting (cfg.model_free)
    recycled: int = 0                # phrases top-k recycling put into the pool (cfg.recycle)
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



def record_pool_stats(stats: GenerationStats, pool, lookups0: int, hits0: int) -> None:
    """Write ``pool``'s size after the call, and its lookups and hits since the counts ``lookups0``/``hits0``, into
    ``stats``."""
    stats.pool_size, stats.pool_keys, stats.pool_bytes = len(pool), pool.num_keys(), pool.nbytes()
    stats.pool_lookups, stats.pool_hits = pool.stats.lookups - lookups0, pool.stats.hits - hits0


def count_cycle(stats: GenerationStats, c: dict, forwards: int, gamma: int, n1: int) -> None:
    """Add one device cycle's read counts ``c`` (the block's fields by name) to ``stats``: one target forward,
    ``forwards`` draft forwards, and the cycle's trace entry (tree of ``1 + draft_len + n1 * suffixes`` nodes)."""
    stats.cycles += 1
    stats.target_forwards += 1
    stats.draft_forwards += forwards
    stats.draft_tokens += c["drafted"]
    stats.guess_accepted += c["drafted"] - c["lived"]
    stats.trunk_accepted += c["trunk_accepted"]
    stats.branch_accepted += c["branch_accepted"]
    stats.recycled += c.get("recycled", 0)
    stats.trace.append({"tree_size": 1 + c["draft_len"] + n1 * c["suffixes"], "accepted": c["emitted"],
                        "verified": c["verified"], "draft_len": c["draft_len"], "gamma": gamma,
                        "draft_forwards": forwards})
