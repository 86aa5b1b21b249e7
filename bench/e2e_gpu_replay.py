"""Replay of recorded acceptance on the GPU benchmark's models (see ``bench.e2e_gpu``'s docstring): every recorded
cycle of a trace run through the fast path with its acceptance FORCED, so tokens/s at the real pair's acceptance is
measured on random-weight models. Not a real generation: labelled "replayed" everywhere."""
from __future__ import annotations

import contextlib
import time

import torch

from bench.clock import Clock
from bench.common import error_record
from bench.e2e_gpu_columns import engine_runners
from bench.traces import clean_cycles


class Replayer:
    """Runs recorded cycles through the fast path on these models (forced acceptance; see the module docstring)."""

    def __init__(self, target, draft, prompt: list[int], cfg, vocab: int, new_tokens: int) -> None:
        self.target, self.draft, self.prompt, self.cfg, self.vocab = target, draft, prompt, cfg, vocab
        self.device = target.device
        # the static cache sizes of the engine (engine.decode / make_runner) for this prompt and new_tokens: the
        # attention spans the whole static cache, so the replay must not use a larger one; a recorded prompt that
        # accepted more tokens than fit is continued from the prompt again (counted in prompt_resets)
        max_len = len(prompt) + new_tokens + cfg.gamma + cfg.ngram
        self.tgt, self.drf = engine_runners(target, draft, max_len, cfg)
        self.tgt.prefill(prompt[:-1])
        self.drf.prefill(prompt[:-1])
        self.base = len(prompt) - 1
        self.counter = 11

    def _tok(self) -> int:
        self.counter = (self.counter + 1) % self.vocab
        return self.counter

    def reset(self) -> None:
        for r in (self.tgt, self.drf):
            r.cache.length.fill_(self.base)
            r._n = self.base
        self.x = list(self.prompt)

    def run_device_cycle(self, cycles_by_prompt: list[list[dict]], cfg, clock: Clock, max_cycles: int) -> dict:
        """Ouroboros: the live path's own code (``DeviceCycle.replay``: whole cycles on the device, one graph and one
        read per cycle) with the recorded forwards and acceptance forced, each recorded prompt from the prompt; one
        untimed pass first (graphs captured), then the timed one."""
        from ouroboros.decoding.device_cycle import DeviceCycle
        from ouroboros.decoding.stats import GenerationStats
        from ouroboros.drafting.gpu_pool import GpuPhrasePool

        left, prompts = max_cycles, []
        for p in cycles_by_prompt:
            if left > 0 and p:
                prompts.append(p[:left])
                left -= len(prompts[-1])
        pool = GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.pool_capacity, vocab_size=self.vocab,
                             device=self.device)
        cycle = DeviceCycle(self.tgt, self.drf, pool, cfg, frozenset())
        for p in prompts:
            cycle.replay(self.prompt, p)                       # warm-up: kernels, tables, one graph per forwards
        stats, seconds, accepted = GenerationStats(), 0.0, 0
        for p in prompts:               # timed after each prompt's prefill, like the live columns' decode rates
            one = GenerationStats()
            clock.sync()
            accepted += cycle.replay(self.prompt, p, one)
            seconds += one.time_total - one.time_prefill        # each cycle ends in a read: synced
            for name in ("cycles", "draft_forwards"):
                setattr(stats, name, getattr(stats, name) + getattr(one, name))
        n = max(stats.cycles, 1)
        cycles = [c for p in prompts for c in p]
        self.reset()
        return {"replayed": True, "kind": "ouroboros", "path": "DeviceCycle.replay (the live path's code)",
                "cycles": stats.cycles, "accepted_tokens": accepted, "seconds": round(seconds, 5),
                "tok_s": round(accepted / seconds, 3) if seconds else None,
                "ms_per_cycle": round(seconds / n * 1e3, 4),
                "mean_tree_size": round(sum(c["tree_size"] for c in cycles) / n, 3),
                "mean_accepted": round(accepted / n, 3),
                "mean_draft_forwards": round(stats.draft_forwards / n, 3),
                "mean_draft_len": round(sum(c["draft_len"] for c in cycles) / n, 3),
                "verify_tree_bucket": cycle.layout.size, "graphs_captured": cycle.graphs.captured,
                "prompt_resets": len(prompts),
                "draft_layout": {"params": cfg.as_dict(),
                                 "tokens_logical": cycle.drafter.slots + (cfg.window + cfg.guess_set) * (cfg.ngram - 1)}}

    @staticmethod
    def kind_of(label: str, cycles_by_prompt: list[list[dict]]) -> str:
        """How a trace label replays: ouroboros (the device cycle), speculative (host draft steps), pool (lookahead,
        prompt lookup: no draft model), plain (greedy)."""
        low = label.lower()
        if "ouroboros" in low:
            return "ouroboros"
        if "speculative" in low:
            return "speculative"
        if "lookahead" in low or "prompt_lookup" in low:
            return "pool"
        if "greedy" in low or not any(c["draft_forwards"] for p in cycles_by_prompt for c in p):
            return "plain"
        return "ouroboros"          # an unlabelled trace with draft forwards: the ouroboros draft layout

    def run(self, label: str, cycles_by_prompt: list[list[dict]], layout_cfg, clock: Clock,
            max_cycles: int) -> dict:
        """Replay ``label``'s cycles: ouroboros through :meth:`run_device_cycle`, the rest as host tree steps."""
        from ouroboros.core.buckets import bucket as _bucket
        from ouroboros.drafting.pool import PhrasePool

        cfg = layout_cfg
        kind = self.kind_of(label, cycles_by_prompt)
        if kind == "ouroboros":
            return self.run_device_cycle(cycles_by_prompt, cfg, clock, max_cycles)
        self.reset()
        hpool = None
        if kind == "pool":
            hpool = PhrasePool(ngram=cfg.ngram, guess_set=cfg.guess_set)
            hpool.seed_from(self.x)
        cycles = [(i, c) for i, p in enumerate(cycles_by_prompt) for c in p][:max_cycles]
        split = {"draft": 0.0, "verify": 0.0, "bookkeeping": 0.0}
        accepted_total = forced_short = resets = 0
        layouts: set[int] = set()
        prompt_idx = cycles[0][0] if cycles else 0
        clock.sync()
        t_start = time.perf_counter()
        for idx, c in cycles:
            tree_size, accepted, dfw = c["tree_size"], c["accepted"], c["draft_forwards"]
            if idx != prompt_idx or self.tgt.n_cached + _bucket(tree_size) + accepted >= self.tgt.cache.max_len \
                    or self.drf.n_cached + 512 + dfw * (cfg.ngram + 16) >= self.drf.cache.max_len:
                self.reset()            # a new recorded prompt (or the cache is full): back to the prompt
                prompt_idx = idx
                resets += 1
            t0 = time.perf_counter()
            if dfw and kind != "plain":
                self.draft_steps(dfw)
                layouts.add(_bucket(1))
            t1 = time.perf_counter()
            path, emitted, trunk_len, short = self.verify_forced(c, cfg.ngram - 1)
            forced_short += short
            t2 = time.perf_counter()
            accepted_total += self.commit(kind, emitted, path, trunk_len, dfw, hpool, cfg.ngram)
            t3 = time.perf_counter()
            split["draft"] += t1 - t0
            split["verify"] += t2 - t1
            split["bookkeeping"] += t3 - t2
        clock.sync()
        seconds = time.perf_counter() - t_start
        n = max(len(cycles), 1)
        rec = {"replayed": True, "kind": kind, "cycles": len(cycles), "accepted_tokens": accepted_total,
               "seconds": round(seconds, 5), "tok_s": round(accepted_total / seconds, 3) if seconds else None,
               "ms_per_cycle": round(seconds / n * 1e3, 4),
               "mean_tree_size": round(sum(c["tree_size"] for _, c in cycles) / n, 3),
               "mean_accepted": round(accepted_total / n, 3),
               "mean_draft_forwards": round(sum(c["draft_forwards"] for _, c in cycles) / n, 3),
               "mean_draft_len": round(sum(c["draft_len"] for _, c in cycles) / n, 3),
               "split_seconds": {k: round(v, 5) for k, v in split.items()},
               "split_fraction": {k: round(v / seconds, 4) if seconds else None for k, v in split.items()},
               "split_note": "host clock at the phases' sync points (draft: one read per cycle, verify: argmax "
                             "read); async device work of bookkeeping lands in the next phase",
               "draft_buckets": sorted(layouts), "prompt_resets": resets, "forced_short_tokens": forced_short}
        self.reset()
        return rec

    def draft_steps(self, draft_forwards: int) -> None:
        """Speculative on the fast path: one host tree step per draft token, from the draft's pending token(s)."""
        from ouroboros.core.tokentree import TokenTree

        pending = self.x[self.drf.n_cached:]
        for _ in range(draft_forwards):
            tree = TokenTree()
            given = tree.add_path(-1, pending)
            prefix = self.drf.n_cached
            argmax = self.drf.forward_tree(tree)
            self.drf.keep(prefix, given)
            pending = [argmax[-1]]

    def verify_forced(self, c: dict, n1: int) -> tuple[list[int], list[int], int, int]:
        """One target verify of a tree of exactly ``tree_size`` nodes (root + draft trunk of ``draft_len`` + branches
        of ``n1`` tokens), then FORCED acceptance (benchmark only): the target keeps ``accepted - 1`` nodes down the
        trunk (then the first branch) regardless of its argmax. Returns (kept nodes, emitted tokens, trunk length,
        tokens the tree was too short to keep)."""
        from ouroboros.core.tokentree import TokenTree

        tree_size, k = c["tree_size"], c["accepted"] - 1
        trunk_len = min(c["draft_len"], tree_size - 1)
        pending = self.x[self.tgt.n_cached:] or [self.x[-1]]
        tree = TokenTree()
        given = tree.add_path(-1, pending[-1:] if len(pending) + trunk_len > tree_size else pending)
        trunk = tree.add_path(given[-1], [self._tok() for _ in range(trunk_len)])
        tip = trunk[-1] if trunk else given[-1]
        room = tree_size - len(tree)
        branches = []
        first = min(room, max(n1, k - trunk_len))
        while room > 0:
            size = min(room, first if not branches else n1)
            branches.append(tree.add_path(tip, [self._tok() for _ in range(size)]))
            room -= size
        prefix = self.tgt.n_cached
        argmax = self.tgt.forward_tree(tree)
        path = trunk[:k] + (branches[0][:k - trunk_len] if k > trunk_len and branches else [])
        self.tgt.keep(prefix, given + path)                         # FORCED acceptance (benchmark only)
        emitted = [tree.tokens[nd] for nd in path] + [argmax[path[-1] if path else given[-1]]]
        return path, emitted, trunk_len, k - len(path)

    def commit(self, kind: str, emitted: list[int], path: list[int], trunk_len: int, draft_forwards: int, hpool,
               ngram: int) -> int:
        """The engine's bookkeeping after a verify: the text grows by ``emitted``, a pool method's pool takes the new
        n-grams, speculative's draft cache is rolled back to what agrees with the accepted text. Returns the count."""
        old_len = len(self.x)
        self.x.extend(emitted)
        if hpool is not None:
            hpool.insert_many((self.x[i], self.x[i + 1:i + ngram])
                              for i in range(max(0, old_len - ngram + 1), len(self.x) - ngram + 1))
        if kind == "speculative":   # draft cache: what agrees with the accepted text
            keep_len = old_len - 1 + 1 + min(len(path), trunk_len) if draft_forwards else self.drf.n_cached
            keep_len = min(keep_len, len(self.x) - 1)
            self.drf.cache.length.fill_(keep_len)
            self.drf._n = keep_len
        return len(emitted)


@torch.inference_mode()
def replay_stage(target, draft, prompt, vocab, traces, args, clock) -> dict:
    from ouroboros.core.config import GPU_DEFAULTS, DecodeConfig

    out: dict = {"label": "REPLAYED acceptance (forced), not a real generation", "methods": {}}
    labels = [m for m in traces if not args.replay_methods or m in args.replay_methods]
    rep = Replayer(target, draft, prompt, GPU_DEFAULTS, vocab, args.new_tokens)
    jobs = []
    for label in labels:
        entry = traces[label]
        trace_cfg = None
        if entry.get("resolved_params"):
            with contextlib.suppress(TypeError, ValueError):
                kinds = {k: type(v) for k, v in GPU_DEFAULTS.as_dict().items()}     # int, bool or float
                trace_cfg = DecodeConfig(**{k: kinds[k](v) for k, v in entry["resolved_params"].items()
                                            if k in kinds})
        if args.replay_layout == "trace" and trace_cfg is not None:
            jobs.append((label, label, trace_cfg))
        else:
            jobs.append((label, label, GPU_DEFAULTS))
            if args.replay_layout == "both" and trace_cfg is not None and trace_cfg != GPU_DEFAULTS \
                    and "ouroboros" in label.lower():
                jobs.append((f"{label}@trace_layout", label, trace_cfg))
    for key, label, cfg in jobs:
        entry = traces[label]
        try:
            rec = rep.run(label, entry["prompts"], cfg, clock, args.replay_max_cycles)
            rec["trace_params"] = entry.get("resolved_params")
            rec["layout_from"] = "trace" if cfg is not GPU_DEFAULTS else "GPU_DEFAULTS"
            out["methods"][key] = rec
        except Exception as err:  # noqa: BLE001 - one method's failure must not end the run
            out["methods"][key] = error_record(err)
    # machinery check: the greedy shape replayed (tree 1, accepted 1) should match our greedy column's decode rate
    try:
        synth = [[{"tree_size": 1, "accepted": 1, "draft_forwards": 0, "draft_len": 0}] * (args.new_tokens - 1)]
        rec = rep.run("greedy_synthetic", synth, GPU_DEFAULTS, clock, args.new_tokens)
        rec["note"] = "synthetic check, not from traces: should equal ours_greedy decode_tok_s"
        out["methods"]["greedy_synthetic"] = rec
    except Exception as err:  # noqa: BLE001
        out["methods"]["greedy_synthetic"] = error_record(err)
    return out



def live_vs_replay(target, draft, prompt: list[int], vocab: int, live: dict, clock: Clock, new_tokens: int) -> dict:
    """The live ouroboros run's own trace replayed (Replayer, forced acceptance) on the same models: tok/s of both
    over the cycles after the first (the live rate: tokens after the first cycle / time after it), and their ratio."""
    from ouroboros.core.config import GPU_DEFAULTS, DecodeConfig

    trace = clean_cycles(live.get("trace") or [])
    if len(trace) < 2:
        return {"status": f"live trace too short ({len(trace)} cycles)"}
    params = {k: v for k, v in (live.get("stats") or {}).get("config", {}).items() if k in GPU_DEFAULTS.as_dict()}
    cfg = DecodeConfig(**params) if params else GPU_DEFAULTS
    after = trace[1:]
    live_seconds = live["seconds"] - live["seconds_prefill_first_token"]
    live_tokens = sum(c["accepted"] for c in after)
    with torch.inference_mode():
        rep = Replayer(target, draft, prompt, cfg, vocab, new_tokens)
        rec = rep.run("ouroboros_live", [after], cfg, clock, len(after))
    live_rate = live_tokens / live_seconds if live_seconds > 0 else None
    ratio = rec["tok_s"] / live_rate if live_rate and rec.get("tok_s") else None
    return {"cycles": len(after), "mean_accepted": round(live_tokens / len(after), 3),
            "mean_tree_size": rec["mean_tree_size"], "params": cfg.as_dict(),
            "live_tok_s": round(live_rate, 3) if live_rate else None, "replay_tok_s": rec.get("tok_s"),
            "replay_over_live": round(ratio, 3) if ratio else None,
            "within_10pct": bool(ratio and abs(ratio - 1) <= 0.10), "replay": rec,
            "what": "the live run's recorded cycles (after the first) replayed on the same models and runners; the "
                    "issue's target: within 10%"}

