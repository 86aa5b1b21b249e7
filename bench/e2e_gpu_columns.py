"""The measured columns of the GPU benchmark: HF generate (eager; static cache + torch.compile) and our fast path
(``ouroboros.generate(fast=True)``), each as decode and end-to-end tokens/s of one greedy generation."""
from __future__ import annotations

import contextlib
import time
import warnings

import torch

from bench.clock import free_memory
from bench.common import error_record


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def hf_generate(model, ids: torch.Tensor, new: int, **kw) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, eos_token_id=None, pad_token_id=0, temperature=None, top_p=None,
                         top_k=None, **kw)
    return out[0, ids.shape[1]:].tolist()


def rates(new: int, seconds: float, seconds_first: float) -> dict:
    """Derived rates: e2e over the whole call, decode over the tokens after the first."""
    decode = max(seconds - seconds_first, 1e-9)
    return {"tokens": new, "seconds": round(seconds, 5), "seconds_prefill_first_token": round(seconds_first, 5),
            "e2e_tok_s": round(new / seconds, 3),
            "decode_ms_per_token": round(decode / max(new - 1, 1) * 1e3, 4),
            "decode_tok_s": round(max(new - 1, 1) / decode, 3)}


def col_hf_eager(model, ids, new, clock) -> dict:
    hf_generate(model, ids, 4)                                    # warm-up (kernels, allocator)
    t1, _ = clock.wall(lambda: hf_generate(model, ids, 1))
    t, out = clock.wall(lambda: hf_generate(model, ids, new))
    rec = rates(new, t, t1)
    rec.update(label="HF generate greedy (default attention, DynamicCache)", output=out,
               attn_implementation=getattr(model.config, "_attn_implementation", None))
    return rec


def col_hf_static_compile(model, ids, new, clock, mode: str) -> dict:
    """HF greedy with a static cache + torch.compile; ``mode`` auto | manual | off.

    Tries ``fullgraph=True`` first; if that raises, records the error and retries once with ``fullgraph=False``.
    """
    try:
        return _hf_static_compile(model, ids, new, clock, mode, fullgraph=True)
    except Exception as err:  # noqa: BLE001 - a graph break or compile failure: one retry, then give up
        if mode == "off":
            raise
        first = error_record(err)
        cleanup_compile(model)
        rec = _hf_static_compile(model, ids, new, clock, mode, fullgraph=False)
        rec["fullgraph_error"] = first["error"]
        return rec


def _hf_static_compile(model, ids, new, clock, mode: str, fullgraph: bool) -> dict:
    from transformers import CompileConfig

    kw = dict(cache_implementation="static")
    original_forward = None
    if mode == "auto":
        kw["compile_config"] = CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
    else:
        kw["disable_compile"] = True
    if mode == "manual":
        original_forward = model.forward
        model.forward = torch.compile(original_forward, mode="reduce-overhead", fullgraph=fullgraph)
    try:
        # full run first (compiles the decode step and sizes the static cache for N), then the 1-token run (prefill
        # only; reuses the larger cache), then a second full warm-up (absorbs any re-recording), then the timed run.
        t_compile, _ = clock.wall(lambda: hf_generate(model, ids, new, **kw))
        t1, _ = clock.wall(lambda: hf_generate(model, ids, 1, **kw))
        hf_generate(model, ids, new, **kw)
        t, out = clock.wall(lambda: hf_generate(model, ids, new, **kw))
        compiled = mode == "manual" or (mode == "auto" and hasattr(model, "_compiled_call"))
    finally:
        if original_forward is not None:
            model.forward = original_forward
    rec = rates(new, t, t1)
    rec.update(label="HF generate greedy, static cache + torch.compile", output=out, compile_mode=mode,
               compiled=bool(compiled), fullgraph=fullgraph, first_call_s_incl_compile=round(t_compile, 3),
               note=None if compiled else "torch.compile not applied (HF compiles only on accelerators; "
                                          "static cache without compile measured)")
    return rec


def cleanup_compile(model) -> None:
    for attr in ("_compiled_call", "_last_compile_config", "_cache", "_previous_max_cache_length"):
        with contextlib.suppress(AttributeError):
            delattr(model, attr)
    with contextlib.suppress(Exception):
        torch._dynamo.reset()
    free_memory()


def engine_runners(target, draft, max_len: int, cfg):
    """The engine's own static runners for a call needing ``max_len`` slots (reused, like its graphs and compiled
    code, by every stage and by ``ouroboros.generate``), emptied."""
    from ouroboros.hf.runners import make_runner

    return (make_runner(target, True, max_len),
            make_runner(draft, True, max_len + 2 * cfg.max_gamma * cfg.ngram))


def col_ours(target, draft, ids, new, clock, method: str, pool_device=None, compile=None) -> dict:
    import ouroboros

    def run():
        firsts = []

        def on_tokens(tokens):
            if not firsts:
                firsts.append(time.perf_counter())        # the engine already synced (tokens are host ints)

        clock.sync()
        t0 = time.perf_counter()
        out, stats = ouroboros.generate(target, draft, ids, max_new_tokens=new, method=method, fast=True,
                                        eos_token_id=[], return_stats=True, on_tokens=on_tokens,
                                        pool_device=pool_device, compile=compile)
        clock.sync()
        return time.perf_counter() - t0, firsts[0] - t0, out[0, ids.shape[1]:].tolist(), stats

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ouroboros.generate(target, draft, ids, max_new_tokens=min(new, 4), method=method, fast=True,
                           eos_token_id=[], pool_device=pool_device, compile=compile)   # warm-up (+ compile)
        t, t_first, out, stats = run()
    graph_failures = sorted({str(w.message)[:300] for w in caught if "graph capture failed" in str(w.message)})
    rec = rates(len(out), t, t_first)
    summary = stats.summary()
    compiled = bool(getattr(target, "_ouroboros_static_runner", None) and target._ouroboros_static_runner.compiled)
    if method == "ouroboros":
        rec["trace"] = list(stats.trace)          # replayed by live_vs_replay
    rec.update(label=f"ouroboros.generate(method={method!r}, fast=True, compile={compiled})", output=out,
               compiled=compiled,
               graphs=target.device.type == "cuda" and not graph_failures, graph_failures=graph_failures,
               stats=summary,
               note="the engine's runner, reused across calls as in generate: the warm-up call captured (and compiled)")
    return rec

