"""End-to-end GPU benchmark on the real pairs' shapes, with replayed acceptance (issue 6 item 4; SPEC §4).

    python bench/e2e_gpu.py                                  # both pairs, prompt 512, 256 new tokens, bf16, one GPU
    python bench/e2e_gpu.py --pairs qwen --traces bench/results/traces_humaneval.json
    python bench/e2e_gpu.py --tiny                           # tiny configs, float32, CPU is fine (a smoke run)

Models are random-weight models built in code from the real configs (no network, no checkpoints; only speed is
measured): pair ``qwen`` = Qwen2.5-Coder-1.5B (target) / Qwen2.5-Coder-0.5B (draft), the real pair's shapes; pair
``llama`` = Llama-2-7B (target) / TinyLlama-1.1B (draft), a scale point. Per pair, all in the same run on the same card:

columns (tokens/s of a ``--prompt-len`` random prompt + ``--new-tokens`` greedy tokens, EOS off)
  hf_eager            HF ``generate`` greedy, default attention (sdpa), DynamicCache
  hf_static_compile   HF ``generate`` greedy, ``cache_implementation="static"`` + torch.compile (``--hf-compile``:
                      "auto" = HF's own decode-step compile via ``compile_config=CompileConfig(fullgraph=True,
                      mode="reduce-overhead")``; "manual" = ``model.forward = torch.compile(model.forward,
                      mode="reduce-overhead", fullgraph=True)``; "off"); if fullgraph=True raises, one retry with
                      fullgraph=False (the first error is kept); a failure is recorded as an error, not raised
  ours_greedy         ``ouroboros.generate(method="greedy", fast=True)`` (static KV, CUDA graph per bucket)
  ours_ouroboros_live ``ouroboros.generate(method="ouroboros", fast=True, pool_device=...)`` on the random pair: a smoke
                      run of the real device-drafting path; random weights accept ~nothing, so its speed means little
  replayed_<method>   REPLAYED: every recorded cycle of the acceptance traces (``--traces``) run through the fast path
                      on these shapes (see below). Not a real generation: labelled "replayed" everywhere.
Each column's ``decode_tok_s`` excludes the prefill (HF: (t(N) - t(1)) / (N - 1); ours: time after the first token);
``e2e_tok_s`` = N / whole call. Ratios use decode rates (both are in the JSON).

step costs (CUDA events on a GPU, perf_counter on a CPU; the fast path's StaticRunner, prompt in the cache)
  target verify per bucket T in {1,16,32,64,128} (device, graph replay) and through the host interface
  (``forward_tree``: tree upload + argmax download); draft forward and full draft step (pool lookup, acceptance,
  window, pool insert, KV commit) of the ouroboros draft layout 1 + (W+G)*(N-1) tokens for ``GPU_DEFAULTS``;
  bookkeeping: KV gather, keep+rollback (host), GPU-pool lookup/insert, host-adapter pool updates, tree building.
  kernels per forward at T in {1,64}, target and draft (``kernels_per_forward``): the torch profiler on a GPU
  (``ouroboros.tuning.probes.cuda_kernels``: graph replays included where the profiler sees them, else the eager forward);
  on a CPU the proxy ``ouroboros.tuning.probes.OpCounter`` (aten ops that launch a GPU kernel; our kernels' reference
  twins count as one kernel each). Columns: ``lean`` = the floor, a gpt-fast-style CUDA-graph decoder with the same
  weights (bench/lean_decoder.py), ``none`` = our runners as they are, and the ``--glue`` modes with their ratio to
  lean; ``ms_per_forward`` by tree size for the same columns.
  ``cycle_probe``: host reads (``ouroboros.tuning.probes.HostReads``) and eager ops (OpCounter: on a GPU the ops outside the
  captured graphs) per cycle of ``generate(method="ouroboros", fast=True, pool_device=...)``, after a warm-up call.

glue (``--glue``: none | fused | compile | all; default all, --tiny: fused), on fresh static runners, last in a pair
  (the other stages run the engine's runners as they ship, "default": fused glue on CUDA)
  none     HF's own glue (``ouroboros.hf.fused_glue.revert_fused_glue``, ``StaticRunner(glue=False)``)
  fused    ``StaticRunner(glue=True)``: ``ouroboros.hf.fused_glue.apply_fused_glue`` on target and draft
  compile  ``StaticRunner(compile=True)`` (fused) with ``automatic_dynamic_shapes`` off (one static graph per tree
           size), at T in {1,64}; records each size's first-call seconds (compile + capture); skipped when the budget
           is short

live vs replay (``live_vs_replay``): the live run's own ``stats.trace`` replayed (below) on the same models and
  runners with the live run's parameters; tok/s of both over the cycles after the first, and replay/live (issue 17:
  at the same acceptance they should agree within 10%).

replay (per recorded cycle: tree_size, accepted, draft_forwards, draft_len)
  ouroboros*: the live path's own code, ``DeviceCycle.replay``: whole cycles on the device (one graph and one read
  each) with the recorded ``draft_forwards``, a trunk of ``draft_len`` and ``accepted - 1`` tokens kept (trunk first,
  then the first suffix), each recorded prompt from the prompt, after one untimed pass that captures the graphs;
  speculative: ``draft_forwards`` host tree steps of the pending token(s); then one target verify of a tree of exactly
  ``tree_size`` nodes (root + draft trunk of ``draft_len`` + branches), FORCED acceptance: the target keeps
  ``accepted - 1`` nodes down the trunk (then the first branch) regardless of its argmax (a benchmark-only path:
  ``StaticRunner.keep`` called with the recorded path instead of the tree walk), the engine's pool updates, and the
  draft-cache rollback to what the real run would have kept. tokens/s = recorded accepted tokens / replay time.
  A missing or unreadable traces file is reported and the replay skipped.

Stage order per pair (the baseline first, so a short budget never loses it; its compile state is reset after it):
build, hf_static_compile, ours_greedy, step costs, replay, ours_ouroboros_live, live_vs_replay, hf_eager, glue
(last: fusing repacks the weights, which stales CUDA graphs captured before it).
A replayed method's ``tok_s`` has no prefill in it, like the columns' ``decode_tok_s`` it is compared with;
``e2e_estimate_tok_s`` adds the static-runner prefill measured in the step costs.

Writes JSON (card, versions, settings, every number) to ``--out`` (default ``bench/results/e2e_gpu_<card>.json``,
``..._tiny.json`` with ``--tiny``) after every stage (a killed run keeps what it measured), a PNG next to it when
matplotlib is available, and prints a short table last. ``--budget-s`` skips the remaining stages (recorded as
skipped) once the run has used that much time.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import re
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "python"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

RESULTS = ROOT / "bench" / "results"
# the real pair's traces recorded with the GPU layout (bench/e2e.py --device-cycle); the older CPU-layout ones else
GPU_LAYOUT_TRACES = [RESULTS / "gpu_layout" / f"traces_{d}.json" for d in ("humaneval", "gsm8k")]
DEFAULT_TRACES = (",".join(map(str, GPU_LAYOUT_TRACES)) if all(p.exists() for p in GPU_LAYOUT_TRACES)
                  else str(RESULTS / "traces_humaneval.json"))
SCHEMA = "ouroboros.e2e_gpu/1"
VERIFY_BUCKETS = (1, 16, 32, 64, 128)
DRAFT_BUCKETS = (1, 16, 64)       # draft forward sizes timed
KERNEL_BUCKETS = (1, 64)          # tree sizes whose kernels per forward are counted (T=1 decode, T=64 verify)
GLUE_MODES = ("none", "fused", "compile")  # --glue all: each (the step costs' "default" is the shipped runner)
# On a CPU our kernels run as their PyTorch reference twins; the kernel proxy counts each call as the one kernel it
# stands in for (ouroboros_kernels.reference: tree attention, and the fused glue's RMSNorm, RoPE and SwiGLU).
# SPEC §4 anchors (one H200, torch 2.11, transformers 5.17, prompt 512): tok/s, and ms per step of a minimal
# CUDA-graph decoder at T=1 / T=64; copied into the JSON for comparison, never used in a ratio.
SPEC_ANCHORS_H200 = {
    "Qwen2.5-Coder-1.5B": {"hf_eager_tok_s": 29.9, "hf_static_compile_tok_s": 204.6, "graph_decoder_ms": [2.00, 2.38]},
    "Qwen2.5-Coder-0.5B": {"hf_eager_tok_s": 34.8, "hf_static_compile_tok_s": 312.8, "graph_decoder_ms": [1.23, 1.51]},
    "Llama-2-7B": {"hf_eager_tok_s": 44.6, "hf_static_compile_tok_s": 121.9, "graph_decoder_ms": [4.87, 5.33]},
}

# ----------------------------------------------------------------------------------------------------- model shapes
# Real configs (HF config.json of each checkpoint), written out so the run needs no network.
QWEN_COMMON = dict(model_type="qwen2", vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                   rms_norm_eps=1e-6, max_position_embeddings=32768, use_sliding_window=False, hidden_act="silu",
                   bos_token_id=151643, eos_token_id=151643)
LLAMA_COMMON = dict(model_type="llama", vocab_size=32000, tie_word_embeddings=False, rope_theta=10_000.0,
                    rms_norm_eps=1e-5, hidden_act="silu", bos_token_id=1, eos_token_id=2)
REAL_PAIRS = {
    "qwen": {
        "target": ("Qwen2.5-Coder-1.5B", dict(QWEN_COMMON, hidden_size=1536, num_hidden_layers=28,
                                              num_attention_heads=12, num_key_value_heads=2,
                                              intermediate_size=8960)),
        "draft": ("Qwen2.5-Coder-0.5B", dict(QWEN_COMMON, hidden_size=896, num_hidden_layers=24,
                                             num_attention_heads=14, num_key_value_heads=2,
                                             intermediate_size=4864)),
    },
    "llama": {
        "target": ("Llama-2-7B", dict(LLAMA_COMMON, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                      num_key_value_heads=32, intermediate_size=11008,
                                      max_position_embeddings=4096)),
        "draft": ("TinyLlama-1.1B", dict(LLAMA_COMMON, hidden_size=2048, num_hidden_layers=22,
                                         num_attention_heads=32, num_key_value_heads=4, intermediate_size=5632,
                                         max_position_embeddings=2048)),
    },
}
TINY_VOCAB = 512
TINY_PAIRS = {
    "qwen": {
        "target": ("tiny-qwen2-target", dict(QWEN_COMMON, vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                             bos_token_id=1, eos_token_id=2)),
        "draft": ("tiny-qwen2-draft", dict(QWEN_COMMON, vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                           bos_token_id=1, eos_token_id=2)),
    },
    "llama": {
        "target": ("tiny-llama-target", dict(LLAMA_COMMON, vocab_size=TINY_VOCAB, hidden_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             intermediate_size=128, max_position_embeddings=4096)),
        "draft": ("tiny-llama-draft", dict(LLAMA_COMMON, vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                           max_position_embeddings=4096)),
    },
}


def build_model(spec: dict, dtype: torch.dtype, device: torch.device, seed: int):
    """A random-weight causal LM of ``spec`` (a config.json as a dict), on ``device`` in ``dtype``, EOS off."""
    import transformers

    kw = dict(spec)
    model_type = kw.pop("model_type")
    rope_theta = kw.pop("rope_theta")
    cfg_cls = {"qwen2": transformers.Qwen2Config, "llama": transformers.LlamaConfig}[model_type]
    try:            # transformers 5.x keeps RoPE settings in rope_parameters
        cfg = cfg_cls(**kw, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    except TypeError:
        cfg = cfg_cls(**kw, rope_theta=rope_theta)
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        except TypeError:
            model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def model_info(name: str, spec: dict, model) -> dict:
    return {"name": name, "config": spec, "params": sum(p.numel() for p in model.parameters()),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "dtype": str(next(model.parameters()).dtype)}


# ----------------------------------------------------------------------------------------------------- timing
class Clock:
    """CUDA events on a GPU, perf_counter (after a sync, where there is one) elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.kind = "cuda events" if self.cuda else "time.perf_counter"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def per_call(self, fn, iters: int, warmup: int = 2, after=None) -> float:
        """Seconds per call of ``fn`` (``after`` runs after each call, inside the timed region: keep it tiny)."""
        for _ in range(warmup):
            fn()
            if after:
                after()
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
                if after:
                    after()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / iters
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
            if after:
                after()
        return (time.perf_counter() - t0) / iters

    def wall(self, fn):
        """(seconds, result) of one call, synchronised before and after."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - t0, out


def ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 4)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def error_record(err: BaseException) -> dict:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    return {"error": f"{type(err).__name__}: {err}"[:2000], "traceback_tail": "".join(tb)[-3000:]}


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# ----------------------------------------------------------------------------------------------------- columns
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


# ----------------------------------------------------------------------------------------------------- step costs
def chain_inputs(t: int, vocab: int, device, gen: torch.Generator):
    ids = torch.randint(0, vocab, (1, t), generator=gen).to(device)
    depths = torch.arange(t, device=device)
    bits = torch.ones(t, t, dtype=torch.bool).tril().to(device)
    return ids, depths, bits


def chain_tree(t: int, vocab: int, start: int = 3):
    from ouroboros.core.tokentree import TokenTree

    tree = TokenTree()
    tree.add_path(-1, [(start + i) % vocab for i in range(t)])
    return tree


@torch.inference_mode()
def step_costs(target, draft, prompt: list[int], cfg, clock: Clock, iters: int, vocab: int, new_tokens: int) -> dict:
    from ouroboros.core.buckets import bucket as _bucket
    from ouroboros.core.tokentree import TokenTree
    from ouroboros.drafting.device_drafter import DeviceDrafter
    from ouroboros.drafting.gpu_pool import GpuPhrasePool

    from ouroboros_kernels import ancestor_mask

    device = target.device
    gen = torch.Generator().manual_seed(1)
    out: dict = {"timing": clock.kind, "units": "ms per call", "context_tokens": len(prompt) - 1}
    # the engine's static cache sizes for this prompt and new_tokens (attention spans the whole static cache)
    max_len = len(prompt) + new_tokens + cfg.gamma + cfg.ngram
    tgt, drf = engine_runners(target, draft, max_len, cfg)
    out["static_cache_slots"] = {"target": tgt.cache.max_len, "draft": drf.cache.max_len}
    n = len(prompt) - 1
    out["prefill_ms"] = {"target": ms(clock.wall(lambda: tgt.prefill(prompt[:-1]))[0]),
                         "draft": ms(clock.wall(lambda: drf.prefill(prompt[:-1]))[0])}

    verify, verify_host, draft_v = {}, {}, {}
    for t in VERIFY_BUCKETS:            # DRAFT_BUCKETS are among them
        args = chain_inputs(t, vocab, device, gen)
        verify[str(t)] = ms(clock.per_call(lambda: tgt.forward_device(*args), iters))
        tree = chain_tree(t, vocab)
        verify_host[str(t)] = ms(clock.per_call(lambda: tgt.forward_tree(tree), iters))
        if t in DRAFT_BUCKETS:
            draft_v[str(t)] = ms(clock.per_call(lambda: drf.forward_device(*args), iters))
    out["target_verify_device"] = verify
    out["decode_T1_ms"] = verify["1"]
    out["graphs"] = bool(tgt.use_graphs and tgt._graphs)
    out["target_verify_host_interface"] = verify_host
    out["draft_forward_device"] = draft_v

    # the ouroboros draft layout (GPU defaults) and the full device draft step
    pool = GpuPhrasePool(ngram=cfg.ngram, guess_set=cfg.guess_set, vocab_size=vocab, device=device)
    pool.seed_from(prompt)
    drafter = DeviceDrafter(drf, pool, cfg.ngram, cfg.window, cfg.guess_set, prompt, topk=cfg.topk)
    lay = drafter._layout(1)
    logical = 1 + (cfg.window + cfg.guess_set) * (cfg.ngram - 1)
    ids = torch.randint(0, vocab, (1, lay.size), generator=gen).to(device)
    depths, bits = lay.inputs(torch.zeros((), dtype=torch.long, device=device))    # one valid pending token
    layout_fwd = clock.per_call(lambda: drf.forward_device(ids, depths, bits), iters)
    phase = drafter._begin(prompt, cfg.gamma, 1)        # one pending token (the prompt's last)

    def reset_draft():
        drf.cache.length.fill_(n)
        phase.dlen.zero_()
        phase.live.fill_(True)

    step = clock.per_call(lambda: drafter._forward(phase), iters, after=reset_draft)
    reset_draft()
    drf._n = n
    out["draft_layout"] = {"params": cfg.as_dict(), "tokens_logical": logical, "tokens_bucket": lay.size,
                           "forward_ms": ms(layout_fwd), "full_step_ms": ms(step),
                           "step_overhead_ms": ms(step - layout_fwd),
                           "what": "full step = pool lookup + forward + acceptance + window slide + pool insert + "
                                   "KV commit (DeviceDrafter._forward), no host sync"}

    # bookkeeping pieces
    book: dict = {}
    src = torch.tensor(list(range(8)) + list(range(20, 26)), dtype=torch.long, device=device)
    book["kv_gather_14_slots"] = ms(clock.per_call(lambda: tgt.cache.gather(tgt.cache.length, src), iters))
    nodes = list(range(8)) + list(range(20, 26))
    book["keep_gather_plus_rollback_host"] = ms(clock.per_call(lambda: (tgt.keep(n, nodes), tgt.rollback(n)),
                                                               iters))
    key = torch.tensor([prompt[-1]], dtype=torch.long, device=device)
    book["gpu_pool_lookup"] = ms(clock.per_call(lambda: pool.lookup(key, cfg.guess_set), iters))
    keys = torch.randint(0, vocab, (cfg.window,), generator=gen).to(device)
    phrases = torch.randint(0, vocab, (cfg.window, cfg.ngram - 1), generator=gen).to(device)
    book["gpu_pool_insert_window"] = ms(clock.per_call(lambda: pool.insert_many(keys, phrases), iters))
    host_items = [(int(k), [int(t) for t in p]) for k, p in zip(keys[:4].tolist(), phrases[:4].tolist())]
    book["host_adapter_pool_insert_4"] = ms(clock.per_call(lambda: pool.host.insert_many(host_items), iters))
    repl = [(k, p, p[::-1]) for k, p in host_items[:cfg.topk]]
    book["host_adapter_pool_replace_topk"] = ms(clock.per_call(lambda: pool.host.replace_many(repl), iters))
    commit_src = torch.arange(1 + cfg.ngram - 1, device=device)
    commit_n = torch.tensor(3, device=device)
    book["draft_commit_device"] = ms(clock.per_call(lambda: drf.commit_device(commit_src, commit_n), iters,
                                                    after=reset_draft))
    reset_draft()
    drf._n = n

    def build_tree():
        tree = TokenTree()
        given = tree.add_path(-1, [5])
        trunk = tree.add_path(given[0], [(7 + i) % vocab for i in range(cfg.gamma)])
        for b in range(cfg.topk):
            tree.add_path(trunk[-1], [(100 + 10 * b + i) % vocab for i in range(cfg.ngram - 1)])
        ancestor_mask(tree.parents)
        return tree.walk(given[0], list(range(len(tree))))

    t0 = time.perf_counter()
    for _ in range(max(iters, 20)):
        build_tree()
    book["host_tree_build_mask_walk"] = ms((time.perf_counter() - t0) / max(iters, 20))
    book["tree_nodes"] = 1 + cfg.gamma + cfg.topk * (cfg.ngram - 1)
    book["verify_bucket_of_that_tree"] = _bucket(book["tree_nodes"])
    out["bookkeeping"] = book

    # kernels per forward and ms per forward: the engine's runners as they ship ("default": fused glue on CUDA)
    # against the lean decoder floor
    ours: dict = {}
    _section(ours, "target", lambda: runner_probe(tgt, (), vocab, clock, iters))
    _section(ours, "draft", lambda: runner_probe(drf, (), vocab, clock, iters))
    lean: dict = {}
    _section(lean, "target", lambda: lean_probe(target, n, VERIFY_BUCKETS, clock, iters))
    _section(lean, "draft", lambda: lean_probe(draft, n, DRAFT_BUCKETS, clock, iters))
    out["lean"] = lean
    out["kernels_per_forward"] = {"method": kernel_method(device),
                                  "target": kernel_table(lean["target"], {"default": ours["target"]}),
                                  "draft": kernel_table(lean["draft"], {"default": ours["draft"]}),
                                  "ours_detail": ours,
                                  "note": "ours = StaticRunner.forward_device as it is (input copies, graph replay, "
                                          "output clone); lean = one graph replay (bench/lean_decoder.py)"}
    out["ms_per_forward"] = {"target": {"lean": lean["target"].get("ms"), "default": verify},
                             "draft": {"lean": lean["draft"].get("ms"), "default": draft_v}}
    # host reads and eager ops per cycle of the live path (last: generate resets the engine's runners)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    _section(out, "cycle_probe", lambda: cycle_probe(target, draft, ids, new_tokens, device))
    return out                    # the runners (and their graphs) are freed when this frame ends


# ----------------------------------------------------------------------------------------------------- kernel probes
# Kernels per forward: the CUDA profiler on a GPU (graph replays included when it sees them, see
# ouroboros.tuning.probes.cuda_kernels); on a CPU the dispatcher-level proxy (ouroboros.tuning.probes.count_kernels).


def kernel_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch profiler (CUDA kernels + memcpy + memset per forward)"
    return ("OpCounter (CPU proxy: aten ops that launch a kernel on a GPU; reference twins of our kernels count as "
            "one)")


def runner_probe(runner, buckets, vocab: int, clock: Clock, iters: int, kernels_at=KERNEL_BUCKETS,
                 first_call: bool = False, time_left=None) -> dict:
    """ms per ``forward_device`` by tree size (a chain of T tokens at the runner's length) and kernels per forward at
    ``kernels_at``; ``first_call``: also the seconds of each size's first call (compile + capture). With
    ``time_left`` (seconds, a callable), sizes are skipped once it is under 30."""
    from ouroboros.tuning import probes

    gen = torch.Generator().manual_seed(2)
    out: dict = {"ms": {}, "kernels": {}}
    if first_call:
        out["first_call_s"] = {}
    if runner.device.type != "cuda" and getattr(runner, "compiled", False):
        # OpCounter is a dispatch mode, under which torch.compile refuses to run (the runner would fall back to
        # eager for good); inductor's CPU kernels are invisible to it anyway
        kernels_at = ()
        out["kernels_note"] = "compiled on a CPU: kernels not counted (OpCounter would stop the compiled code)"
    for t in sorted(set(buckets) | set(kernels_at)):
        if time_left is not None and time_left() < 30:
            out.setdefault("skipped_sizes", []).append(t)
            continue
        args = chain_inputs(t, vocab, runner.device, gen)
        seconds, _ = clock.wall(lambda: runner.forward_device(*args))
        if first_call:
            out["first_call_s"][str(t)] = round(seconds, 3)
        if t in buckets:
            out["ms"][str(t)] = ms(clock.per_call(lambda: runner.forward_device(*args), iters))
        if t in kernels_at:
            eager = getattr(runner, "_run_step", None)
            out["kernels"][str(t)] = probes.count_kernels(lambda: runner.forward_device(*args), runner.device,
                                                   eager=(lambda: eager(*args)) if eager else None)
    return out


def _lean_decoder_module():
    """bench/lean_decoder.py, imported by path (bench/ is not a package)."""
    import importlib.util

    name = "bench_lean_decoder"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / "lean_decoder.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module           # dataclasses look their module up while the class is created
        spec.loader.exec_module(module)
    return sys.modules[name]


def lean_probe(model, prefix_len: int, buckets, clock: Clock, iters: int) -> dict:
    """The lean decoder floor (bench/lean_decoder.py) with ``model``'s weights: ms by tree size, kernels at
    KERNEL_BUCKETS."""
    longest = max(*buckets, *KERNEL_BUCKETS)
    dec = _lean_decoder_module().LeanDecoder.from_hf(model, max_len=prefix_len + longest + 8)
    try:
        out = {"ms": {str(t): round(dec.step_ms(t, prefix_len, iters), 4) for t in buckets}, "kernels": {}}
        for t in KERNEL_BUCKETS:
            prof = dec.kernel_profile(t, prefix_len)
            out["kernels"][str(t)] = prof
        out["timing"] = clock.kind
        out["graphs"] = dec.use_graphs
        return out
    finally:
        del dec
        free_memory()


def kernel_table(lean: dict, modes: dict) -> dict:
    """``{T: {"lean": n, mode: n, f"{mode}_vs_lean": ratio}}`` from probes' ``kernels`` sections."""
    table_: dict = {}
    for t in map(str, KERNEL_BUCKETS):
        row: dict = {"lean": ((lean.get("kernels") or {}).get(t) or {}).get("total")}
        for mode, probe in modes.items():
            n = ((probe.get("kernels") or {}).get(t) or {}).get("total")
            row[mode] = n
            if n and row["lean"]:
                row[f"{mode}_vs_lean"] = round(n / row["lean"], 3)
        table_[t] = row
    return table_


def cycle_probe(target, draft, ids, new_tokens: int, device: torch.device) -> dict:
    """Host reads and eager ops per cycle of the live ouroboros path (``generate(fast=True, pool_device=...)``,
    warmed up first so that no graph capture is counted). Eager ops: on a GPU the ops outside the captured
    graphs (a replay dispatches no aten op); on a CPU (no graphs) every op of the cycle."""
    import ouroboros
    from ouroboros.tuning.probes import HostReads, OpCounter

    # compile=False: both probes are dispatch modes, under which torch.compile refuses to run; the host reads and the
    # ops outside the graphs do not depend on what runs inside them
    kw = dict(max_new_tokens=min(new_tokens, 32), method="ouroboros", fast=True, eos_token_id=[],
              pool_device=device, compile=False)
    from ouroboros.decoding.device_cycle import DeviceCycle

    for _ in range(2):          # a cycle shape is run eagerly once, captured at its second use
        ouroboros.generate(target, draft, ids, **kw)
    with HostReads() as reads, OpCounter() as ops, ops.opaque_function(DeviceCycle, "_cycle", "cycle"), \
            ops.opaque_function(DeviceCycle, "_start", "start"):      # start: prefill and pool seeding, once
        _, stats = ouroboros.generate(target, draft, ids, return_stats=True, **kw)
    cycles = max(stats.cycles, 1)
    kinds: dict = {}
    for s in reads.seen:
        kinds[s] = kinds.get(s, 0) + 1
    inside = ops.counts["cycle"] if device.type != "cuda" else 0
    return {"cycles": stats.cycles, "tokens": stats.tokens, "host_reads": len(reads.seen),
            "host_reads_per_cycle": round(len(reads.seen) / cycles, 3), "host_read_kinds": kinds,
            "eager_ops_outside_cycle_per_cycle": round((ops.total - ops.counts["cycle"] - ops.counts["start"])
                                                       / cycles, 1),
            "eager_ops_per_cycle": round((ops.total - inside - ops.counts["start"]) / cycles, 1),
            "eager_ops_top": ops.top(8),
            "eager_ops_scope": ("outside the CUDA graphs (a replayed cycle dispatches none; 'cycle' counts the cycle "
                                "calls)" if device.type == "cuda" else
                                "outside the cycle function (no graphs on CPU; the cycle itself is not counted)"),
            "note": "" if device.type == "cuda" else
                    "CPU: the device pool runs its reference backend, which reads the host inside the cycle; the "
                    "structure (<= 1 read per cycle) is checked with the Triton kernels in tests/test_device_cycle.py",
            "device_cycle": getattr(stats, "device_cycle", None), "config": stats.config}


def _section(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``, or the error (one probe's failure keeps the rest of the step costs)."""
    try:
        out[key] = fn()
    except Exception as err:  # noqa: BLE001
        out[key] = error_record(err)


@torch.inference_mode()
def glue_stage(target, draft, prompt: list[int], modes, clock: Clock, iters: int, vocab: int, new_tokens: int,
               cfg, budget_left) -> dict:
    """The step costs of each glue mode on fresh static runners: "none" (HF's own glue: the fusion reverted),
    "fused" (``ouroboros.hf.fused_glue``) and "compile" (``StaticRunner(compile=True)``, fused, one static graph per
    tree size). Runs last in a pair: fusing repacks the weights, which stales graphs captured before it."""
    from ouroboros.hf import fused_glue
    from ouroboros.hf.static_runner import StaticRunner

    max_len = len(prompt) + new_tokens + cfg.gamma + cfg.ngram + max(VERIFY_BUCKETS)
    out: dict = {"method": kernel_method(target.device), "modes": {}}
    for mode in modes:
        rec: dict = {}
        out["modes"][mode] = rec
        if mode == "compile" and budget_left() < (10 if target.device.type == "cpu" else 90):
            rec["status"] = "skipped: time budget (a compile per tree size)"
            continue
        saved = torch._dynamo.config.automatic_dynamic_shapes
        try:
            for role, model, buckets in (("target", target, VERIFY_BUCKETS), ("draft", draft, DRAFT_BUCKETS)):
                if mode == "compile":
                    if budget_left() < (5 if target.device.type == "cpu" else 60):
                        rec[role] = {"status": "skipped: time budget"}
                        continue
                    buckets = KERNEL_BUCKETS                # a compile per size: only the sizes counted
                    torch._dynamo.config.automatic_dynamic_shapes = False   # one static graph per tree size
                elif mode == "none":
                    fused_glue.revert_fused_glue(model)
                runner = StaticRunner(model, max_len, compile=mode == "compile", glue=mode != "none")
                runner.prefill(prompt[:-1])
                rec[role] = runner_probe(runner, buckets, vocab, clock, iters, first_call=mode == "compile",
                                         time_left=budget_left if mode == "compile" else None)
                rec[role]["compiled"] = runner.compiled
                del runner
            rec["status"] = "measured"
        except Exception as err:  # noqa: BLE001 - one mode's failure must not end the pair
            rec.update(error_record(err))
        finally:
            torch._dynamo.config.automatic_dynamic_shapes = saved
            if mode == "compile":
                with contextlib.suppress(Exception):
                    torch._dynamo.reset()
            free_memory()
    return out


def live_vs_replay(target, draft, prompt: list[int], vocab: int, live: dict, clock: Clock, new_tokens: int) -> dict:
    """The live ouroboros run's own trace replayed (Replayer, forced acceptance) on the same models: tok/s of both
    over the cycles after the first (the live rate: tokens after the first cycle / time after it), and their ratio."""
    from ouroboros.core.config import GPU_DEFAULTS, DecodeConfig

    trace = _clean_cycles(live.get("trace") or [])
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


# ----------------------------------------------------------------------------------------------------- traces
def _is_cycle(c) -> bool:
    return isinstance(c, dict) and "tree_size" in c and "accepted" in c


def _clean_cycles(cycles) -> list[dict]:
    out = []
    for c in cycles:
        if not _is_cycle(c):
            continue
        out.append({"tree_size": max(1, int(c["tree_size"])), "accepted": max(1, int(c["accepted"])),
                    "draft_forwards": max(0, int(c.get("draft_forwards", 0) or 0)),
                    "draft_len": max(0, int(c.get("draft_len", 0) or 0))})
    return out


def _prompts_of(entry) -> list[list[dict]]:
    """Per-prompt cycle lists from one method's entry in any supported shape."""
    if isinstance(entry, list):
        if any(_is_cycle(c) for c in entry):          # a list of cycles (other items are ignored)
            return [_clean_cycles(entry)]
        prompts = []
        for p in entry:
            prompts.extend(_prompts_of(p))
        return prompts
    if isinstance(entry, dict):
        if _is_cycle(entry):
            return [_clean_cycles([entry])]
        for key in ("prompts", "trace", "cycles"):
            if key in entry:
                return _prompts_of(entry[key])
    return []


def load_traces(path: Path) -> tuple[dict | None, str]:
    """``label -> {"prompts": [[cycle, ...], ...], "resolved_params": dict | None}`` and a status line.

    Accepted shapes: the real-models benchmark's file (``{"methods": {label: {"resolved_params", "prompts":
    [{"trace": [cycle, ...]}, ...]}}}``), a plain list of cycles (label "trace"), a list of per-prompt lists, or a
    dict ``label -> list``. A cycle is a dict with ``tree_size`` and ``accepted`` (+ optional ``draft_forwards``,
    ``draft_len``).
    """
    if path is None or not path.exists():
        return None, f"traces file not found: {path} (replay skipped; run bench/e2e.py on the real pair first)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"traces file unreadable: {path}: {err} (replay skipped)"
    entries: dict = {}
    if isinstance(data, list):
        entries["trace"] = data
    elif isinstance(data, dict):
        methods = data.get("methods", data)
        if isinstance(methods, dict) and any(k in methods for k in ("prompts", "trace", "cycles")):
            methods = {"trace": methods}
        if isinstance(methods, dict):
            entries = {k: v for k, v in methods.items() if isinstance(v, (list, dict))}
    out = {}
    for label, entry in entries.items():
        prompts = [p for p in _prompts_of(entry) if p]
        if prompts:
            params = entry.get("resolved_params") if isinstance(entry, dict) else None
            out[label] = {"prompts": prompts, "resolved_params": params}
    if not out:
        return None, f"traces file {path} holds no cycles with tree_size/accepted (replay skipped)"
    return out, f"loaded {path}: " + ", ".join(f"{k} ({sum(len(p) for p in v['prompts'])} cycles)"
                                              for k, v in out.items())


def load_trace_files(spec: str | None) -> tuple[dict | None, str]:
    """:func:`load_traces` of each file in the comma list ``spec``; with several files each label is prefixed by its
    file's data set (``"gsm8k/ouroboros"``)."""
    paths = [Path(p) for p in (spec or "").split(",") if p.strip()]
    if len(paths) <= 1:
        return load_traces(paths[0] if paths else None)
    merged, status = {}, []
    for path in paths:
        traces, line = load_traces(path)
        status.append(line)
        if traces:
            tag = None
            with contextlib.suppress(OSError, ValueError, AttributeError):
                tag = json.loads(path.read_text()).get("dataset")
            tag = tag if isinstance(tag, str) and tag else path.stem
            merged.update({f"{tag}/{label}": entry for label, entry in traces.items()})
    return (merged or None), "; ".join(status)


# ----------------------------------------------------------------------------------------------------- replay
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
                "verify_tree_bucket": cycle.layout.size, "graphs_captured": len(cycle._graphs),
                "prompt_resets": len(prompts),
                "draft_layout": {"params": cfg.as_dict(),
                                 "tokens_logical": cycle.drafter.slots + (cfg.window + cfg.guess_set) * (cfg.ngram - 1)}}

    def run(self, label: str, cycles_by_prompt: list[list[dict]], layout_cfg, clock: Clock,
            max_cycles: int) -> dict:
        """Replay ``label``'s cycles: ouroboros through :meth:`run_device_cycle`, the rest as host tree steps."""
        from ouroboros.core.buckets import bucket as _bucket
        from ouroboros.core.tokentree import TokenTree
        from ouroboros.drafting.pool import PhrasePool

        cfg = layout_cfg
        n1 = cfg.ngram - 1
        low = label.lower()
        if "ouroboros" in low:
            kind = "ouroboros"
        elif "speculative" in low:
            kind = "speculative"
        elif "lookahead" in low or "prompt_lookup" in low:
            kind = "pool"
        elif "greedy" in low or not any(c["draft_forwards"] for p in cycles_by_prompt for c in p):
            kind = "plain"
        else:                       # an unlabelled trace with draft forwards: the ouroboros draft layout
            kind = "ouroboros"
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
            tree_size, accepted, dfw, dlen = c["tree_size"], c["accepted"], c["draft_forwards"], c["draft_len"]
            if idx != prompt_idx or self.tgt.n_cached + _bucket(tree_size) + accepted >= self.tgt.cache.max_len \
                    or self.drf.n_cached + 512 + dfw * (cfg.ngram + 16) >= self.drf.cache.max_len:
                self.reset()            # a new recorded prompt (or the cache is full): back to the prompt
                prompt_idx = idx
                resets += 1
            t0 = time.perf_counter()
            # ---- draft phase
            if dfw and kind != "plain":
                pending = self.x[self.drf.n_cached:]
                for _ in range(dfw):          # speculative on the fast path: one host tree step per draft token
                    tree = TokenTree()
                    given = tree.add_path(-1, pending)
                    prefix = self.drf.n_cached
                    argmax = self.drf.forward_tree(tree)
                    self.drf.keep(prefix, given)
                    pending = [argmax[-1]]
                layouts.add(_bucket(1))
            t1 = time.perf_counter()
            # ---- verify: a tree of exactly tree_size nodes, forced acceptance of accepted - 1 nodes
            k = accepted - 1
            trunk_len = min(dlen, tree_size - 1)
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
            t2 = time.perf_counter()
            path = trunk[:k] + (branches[0][:k - trunk_len] if k > trunk_len and branches else [])
            forced_short += k - len(path)
            self.tgt.keep(prefix, given + path)                         # FORCED acceptance (benchmark only)
            emitted = [tree.tokens[nd] for nd in path] + [argmax[path[-1] if path else given[-1]]]
            old_len = len(self.x)
            self.x.extend(emitted)
            accepted_total += len(emitted)
            if hpool is not None:
                n = cfg.ngram
                hpool.insert_many((self.x[i], self.x[i + 1:i + n])
                                  for i in range(max(0, old_len - n + 1), len(self.x) - n + 1))
            if kind == "speculative":   # draft cache: what agrees with the accepted text
                keep_len = old_len - 1 + 1 + min(len(path), trunk_len) if dfw else self.drf.n_cached
                keep_len = min(keep_len, len(self.x) - 1)
                self.drf.cache.length.fill_(keep_len)
                self.drf._n = keep_len
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
                trace_cfg = DecodeConfig(**{k: int(v) for k, v in entry["resolved_params"].items()
                                            if k in GPU_DEFAULTS.as_dict()})
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


# ----------------------------------------------------------------------------------------------------- report
def card_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def card_slug(name: str) -> str:
    m = re.search(r"(h100|h200|h20|a100|a10g?|l40s?|l4|b200|gh200|rtx\s*\d+)", name.lower())
    if m:
        return re.sub(r"\s+", "", m.group(1))
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "device"


def versions() -> dict:
    import transformers

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        import ouroboros
        info["ouroboros"] = ouroboros.__version__
    with contextlib.suppress(Exception):
        import ouroboros_kernels
        info["kernel_backends"] = ouroboros_kernels.backend_status()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def nested_errors(rec, path: str = "") -> list[tuple[str, str]]:
    """(path, message) of every ``"error"`` recorded below ``rec`` (a probe or mode that failed inside a stage)."""
    found = []
    if isinstance(rec, dict):
        for key, value in rec.items():
            if key == "error" and path:
                found.append((path, str(value)[:300]))
            elif isinstance(value, dict):
                found.extend(nested_errors(value, f"{path}.{key}" if path else key))
    return found


def merge_glue(pair: dict) -> None:
    """Put each glue mode's kernels and ms per forward into the step costs' tables next to "lean" and "none"."""
    steps, glue = pair.get("step_costs") or {}, pair.get("glue") or {}
    kpf, mpf = steps.get("kernels_per_forward"), steps.get("ms_per_forward")
    if not kpf or not mpf:
        return
    for mode, rec in (glue.get("modes") or {}).items():
        for role in ("target", "draft"):
            probe = rec.get(role) if isinstance(rec, dict) else None
            if not isinstance(probe, dict) or "ms" not in probe:
                continue
            mpf[role][mode] = probe["ms"]
            if probe.get("kernels_note"):
                continue
            lean_row = kpf[role]
            for t, row in lean_row.items():
                n = ((probe.get("kernels") or {}).get(t) or {}).get("total")
                row[mode] = n
                if n and row.get("lean"):
                    row[f"{mode}_vs_lean"] = round(n / row["lean"], 3)


def compute_ratios(pair: dict) -> None:
    cols = pair.get("columns", {})

    def rate(name, key="decode_tok_s"):
        c = cols.get(name) or {}
        return c.get(key) if isinstance(c, dict) else None

    hf_c, ours = rate("hf_static_compile"), rate("ours_greedy")
    hf_e = rate("hf_eager")
    ratios = {}
    if ours and hf_c:
        ratios["ours_greedy_vs_hf_static_compile"] = round(ours / hf_c, 3)
    if ours and hf_e:
        ratios["ours_greedy_vs_hf_eager"] = round(ours / hf_e, 3)
    if hf_c and hf_e:
        ratios["hf_static_compile_vs_hf_eager"] = round(hf_c / hf_e, 3)
    steps = pair.get("step_costs") or {}
    pre = (steps.get("prefill_ms") or {})
    for label, rec in ((pair.get("replay") or {}).get("methods") or {}).items():
        if not isinstance(rec, dict) or not rec.get("tok_s"):
            continue
        if hf_c:
            rec["vs_hf_static_compile"] = round(rec["tok_s"] / hf_c, 3)
            ratios[f"replayed_{label}_vs_hf_static_compile"] = rec["vs_hf_static_compile"]
        if ours:
            rec["vs_ours_greedy"] = round(rec["tok_s"] / ours, 3)
            ratios[f"replayed_{label}_vs_ours_greedy"] = rec["vs_ours_greedy"]
        if pre.get("target") is not None and pre.get("draft") is not None:
            new = pair["settings"]["new_tokens"]
            prefill_s = (pre["target"] + (pre["draft"] if rec.get("kind") in ("ouroboros", "speculative") else 0)) / 1e3
            rec["e2e_estimate_tok_s"] = round(new / (prefill_s + new / rec["tok_s"]), 3)
            rec["e2e_estimate_note"] = "N / (static-runner prefill of target (+draft) + N / replayed tok/s)"
    pair["ratios"] = ratios


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def table(results: dict) -> list[str]:
    lines = []
    for name, pair in results["pairs"].items():
        models = pair.get("models", {})
        t = models.get("target", {}).get("name", "?")
        d = models.get("draft", {}).get("name", "?")
        lines.append(f"== {name}: {t} / {d} on {results['card']} ({results['settings']['dtype']}, prompt "
                     f"{results['settings']['prompt_len']}, {results['settings']['new_tokens']} new tokens)")
        lines.append(f"{'column':48s} {'decode tok/s':>12s} {'ms/tok':>8s} {'e2e tok/s':>10s} "
                     f"{'vs HF st+c':>10s} {'vs ours gr':>10s}")
        cols = pair.get("columns", {})
        hf_c = (cols.get("hf_static_compile") or {}).get("decode_tok_s")
        ours = (cols.get("ours_greedy") or {}).get("decode_tok_s")

        def row(label, dec, mspt, e2e):
            vs_h = f"{dec / hf_c:.2f}x" if dec and hf_c else "-"
            vs_o = f"{dec / ours:.2f}x" if dec and ours else "-"
            lines.append(f"{label:48s} {_f(dec, 1):>12s} {_f(mspt, 3):>8s} {_f(e2e, 1):>10s} {vs_h:>10s} {vs_o:>10s}")

        for key in ("hf_eager", "hf_static_compile", "ours_greedy", "ours_greedy_nocompile", "ours_ouroboros_live"):
            c = cols.get(key)
            if c is None:
                continue
            if "decode_tok_s" not in c:
                why = c.get("error") or c.get("skipped") or "?"
                lines.append(f"{key:48s} {why[:80]}")
                continue
            label = key + ("" if c.get("compiled", True) else " (NOT compiled)")
            row(label, c["decode_tok_s"], c["decode_ms_per_token"], c["e2e_tok_s"])
        rp = pair.get("replay") or {}
        if rp.get("status"):
            lines.append(f"replay: {rp['status'][:110]}")
        if rp.get("error") or rp.get("skipped"):
            lines.append(f"replay: {(rp.get('error') or rp.get('skipped'))[:110]}")
        for label, rec in (rp.get("methods") or {}).items():
            if "tok_s" in rec:
                row(f"REPLAYED {label} (acc/cyc {rec['mean_accepted']:.2f})", rec["tok_s"],
                    rec["ms_per_cycle"], rec.get("e2e_estimate_tok_s"))
            else:
                lines.append(f"REPLAYED {label:39s} {(rec.get('error') or '?')[:80]}")
        sc = pair.get("step_costs") or {}
        if "target_verify_device" in sc:
            v = sc["target_verify_device"]
            lay = sc.get("draft_layout", {})
            book = sc.get("bookkeeping", {})
            lines.append("step ms: target verify " + " ".join(f"T{k}={_f(x)}" for k, x in v.items())
                         + f" | draft T1={_f(sc['draft_forward_device'].get('1'))}, layout "
                         f"{lay.get('tokens_logical')}->{lay.get('tokens_bucket')} fwd {_f(lay.get('forward_ms'))} "
                         f"step {_f(lay.get('full_step_ms'))}")
            lines.append(f"bookkeeping ms: gather {_f(book.get('kv_gather_14_slots'), 3)}, keep+rollback "
                         f"{_f(book.get('keep_gather_plus_rollback_host'), 3)}, pool lookup "
                         f"{_f(book.get('gpu_pool_lookup'), 3)} insert {_f(book.get('gpu_pool_insert_window'), 3)}, "
                         f"host pool {_f(book.get('host_adapter_pool_insert_4'), 3)}, tree "
                         f"{_f(book.get('host_tree_build_mask_walk'), 3)}")
        elif sc:
            lines.append(f"step costs: {(sc.get('error') or sc.get('skipped') or '?')[:100]}")
        lines.extend(step_cost_lines(pair))
    return lines


def step_cost_lines(pair: dict) -> list[str]:
    """The step-cost table: kernels and ms per forward (lean floor vs each glue mode), host reads and eager ops per
    cycle of the live path, live vs replay."""
    lines = []
    sc = pair.get("step_costs") or {}
    kpf, mpf = sc.get("kernels_per_forward"), sc.get("ms_per_forward")
    if kpf:
        lines.append(f"kernels/forward ({kpf['method'].split(' (')[0]}):")
        for role in ("target", "draft"):
            cells = []
            for t, row in (kpf.get(role) or {}).items():
                modes = [f"{m} {row[m]}" + (f" ({row[m + '_vs_lean']:.2f}x)" if row.get(m + "_vs_lean") else "")
                         for m in ("default", *GLUE_MODES) if m in row]
                cells.append(f"T{t}: lean {row.get('lean', '-')}, " + ", ".join(modes))
            lines.append(f"  {role:6s} " + " | ".join(cells))
    if mpf:
        lines.append("ms/forward by tree size:")
        for role in ("target", "draft"):
            for mode, by_t in (mpf.get(role) or {}).items():
                if by_t:
                    lines.append(f"  {role:6s} {mode:8s} " + " ".join(f"T{t}={_f(x, 3)}" for t, x in by_t.items()))
    for mode, rec in ((pair.get("glue") or {}).get("modes") or {}).items():
        if rec.get("status") != "measured" or rec.get("error"):
            lines.append(f"glue {mode}: {(rec.get('error') or rec.get('status') or '?')[:100]}")
        elif mode == "compile":
            first = {role: (rec.get(role) or {}).get("first_call_s") for role in ("target", "draft")}
            lines.append("glue compile first call s (compile + capture): " + "; ".join(
                f"{role} " + " ".join(f"T{t}={x}" for t, x in (v or {}).items()) for role, v in first.items()))
    cp = sc.get("cycle_probe")
    if isinstance(cp, dict) and "host_reads_per_cycle" in cp:
        lines.append(f"live ouroboros cycle: {cp['host_reads_per_cycle']:.1f} host reads/cycle, "
                     f"{cp['eager_ops_per_cycle']:.0f} eager ops/cycle ({cp['eager_ops_scope'].split(' (')[0]}), "
                     f"{cp['cycles']} cycles" + (" [CPU: reference pool reads]" if cp.get("note") else ""))
    elif isinstance(cp, dict) and cp.get("error"):
        lines.append(f"live ouroboros cycle probe: {cp['error'][:100]}")
    lv = pair.get("live_vs_replay")
    if isinstance(lv, dict) and lv.get("live_tok_s"):
        lines.append(f"live vs replay (same trace, {lv['cycles']} cycles, acc/cyc {lv['mean_accepted']:.2f}): live "
                     f"{lv['live_tok_s']:.1f} tok/s, replay {_f(lv.get('replay_tok_s'), 1)} tok/s, replay/live "
                     f"{_f(lv.get('replay_over_live'))} ({'within' if lv['within_10pct'] else 'NOT within'} 10%)")
    elif isinstance(lv, dict):
        lines.append(f"live vs replay: {(lv.get('error') or lv.get('status') or lv.get('skipped') or '?')[:100]}")
    return lines


def plot(results: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pairs = list(results["pairs"])
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6.5 * max(len(pairs), 1), 4.8), squeeze=False)
    for ax, name in zip(axes[0], pairs):
        pair = results["pairs"][name]
        labels, vals, colors = [], [], []
        for key, color in (("hf_eager", "#999999"), ("hf_static_compile", "#666666"), ("ours_greedy", "#4c72b0"),
                           ("ours_greedy_nocompile", "#7d9bc9"), ("ours_ouroboros_live", "#8fa9d6")):
            c = (pair.get("columns") or {}).get(key) or {}
            if c.get("decode_tok_s"):
                labels.append(key + ("" if c.get("compiled", True) else "\n(not compiled)"))
                vals.append(c["decode_tok_s"])
                colors.append(color)
        for label, rec in ((pair.get("replay") or {}).get("methods") or {}).items():
            if rec.get("tok_s"):
                labels.append(f"REPLAYED\n{label}")
                vals.append(rec["tok_s"])
                colors.append("#dd8452")
        bars = ax.bar(range(len(vals)), vals, color=colors)
        for b, v in zip(bars, vals):
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        m = pair.get("models", {})
        ax.set_title(f"{m.get('target', {}).get('name', name)} / {m.get('draft', {}).get('name', '')}", fontsize=9)
        ax.set_ylabel("decode tokens/s (replayed: accepted tokens/s)")
    s = results["settings"]
    fig.suptitle(f"{results['card']}, {s['dtype']}, prompt {s['prompt_len']}, {s['new_tokens']} new tokens, "
                 f"torch {results['versions']['torch']}, transformers {results['versions']['transformers']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny configs, float32, few tokens (runs on a CPU)")
    ap.add_argument("--pairs", default="qwen,llama", help="comma list of: qwen, llama")
    ap.add_argument("--prompt-len", type=int, default=None, help="random prompt tokens (default 512; tiny 24)")
    ap.add_argument("--new-tokens", type=int, default=None, help="new tokens (default 256; tiny 12)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (tiny: float32)")
    ap.add_argument("--device", default=None, help="default cuda when available (tiny: cpu unless --device)")
    ap.add_argument("--traces", default=DEFAULT_TRACES,
                    help="acceptance traces to replay (a comma list: labels get the file's data set as prefix)")
    ap.add_argument("--replay-methods", default="", help="comma list of trace labels (default: all in the file)")
    ap.add_argument("--replay-max-cycles", type=int, default=None, help="per method (default 400; tiny 12)")
    ap.add_argument("--replay-layout", choices=["gpu", "trace", "both"], default="both",
                    help="draft layout (and n-gram size) for replay: GPU_DEFAULTS, the trace's resolved params, or "
                         "both (default: GPU_DEFAULTS for every method, plus '<label>@trace_layout' for ouroboros "
                         "methods whose trace carries other params)")
    ap.add_argument("--hf-compile", choices=["auto", "manual", "off"], default="auto")
    ap.add_argument("--ours-compile", action="store_true",
                    help="our fast path with torch.compile inside the CUDA graphs (OUROBOROS_COMPILE=1); adds an "
                         "ours_greedy_nocompile column")
    ap.add_argument("--skip", default="", help="comma list of stages to skip: hf_eager, hf_static_compile, "
                                               "ours_greedy, ours_ouroboros_live, step_costs, replay, "
                                               "live_vs_replay, glue")
    ap.add_argument("--glue", choices=["none", "fused", "compile", "all"], default=None,
                    help="step costs of the glue modes besides our runners as they are ('none'): 'fused' "
                         "(ouroboros.hf.fused_glue), 'compile' (StaticRunner(compile=True), static shapes), 'all' = "
                         "both (default: all; --tiny: fused, as a CPU inductor compile takes ~45 s per shape)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per step cost (default 20; tiny 3)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="skip remaining stages after this many seconds (the whole script should fit 8 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    tiny = args.tiny
    args.prompt_len = args.prompt_len or (24 if tiny else 512)
    args.new_tokens = args.new_tokens or (12 if tiny else 256)
    args.dtype = args.dtype or ("float32" if tiny else "bfloat16")
    args.iters = args.iters or (3 if tiny else 20)
    args.replay_max_cycles = args.replay_max_cycles or (12 if tiny else 400)
    args.glue = args.glue or ("fused" if tiny else "all")
    if args.device is None and not tiny and not torch.cuda.is_available():
        ap.error("no CUDA device: the real shapes (up to 7B) need a GPU; use --tiny for a CPU smoke run, or pass "
                 "--device cpu to insist")
    args.device = args.device or ("cpu" if tiny else "cuda")
    args.replay_methods = [m for m in args.replay_methods.split(",") if m]
    args.skip = {s for s in args.skip.split(",") if s}
    if args.ours_compile:
        os.environ["OUROBOROS_COMPILE"] = "1"
    args.pairs = [p for p in args.pairs.split(",") if p]
    for p in args.pairs:
        if p not in REAL_PAIRS:
            ap.error(f"unknown pair {p!r}; choose from {sorted(REAL_PAIRS)}")
    if args.new_tokens < 2 or args.prompt_len < 2:
        ap.error("--new-tokens and --prompt-len must be >= 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    clock = Clock(device)
    if device.type == "cpu" and args.tiny:
        torch.set_num_threads(1)        # tiny models are per-op overhead bound: one thread is fastest
    from ouroboros.core.config import GPU_DEFAULTS

    card = card_name() if device.type == "cuda" else "cpu"
    stem = f"e2e_gpu_{card_slug(card)}" + ("_tiny" if args.tiny else "")
    out_path = Path(args.out) if args.out else RESULTS / f"{stem}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    traces, trace_status = load_trace_files(args.traces)
    print(trace_status, flush=True)
    results = {
        "schema": SCHEMA, "what": "random-weight models with real configs; speed only (see bench/e2e_gpu.py)",
        "tiny": args.tiny, "card": card, "device": str(device),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "versions": versions(),
        "settings": {"pairs": args.pairs, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "dtype": args.dtype, "hf_compile": args.hf_compile, "ours_compile": args.ours_compile,
                     "glue": args.glue, "iters": args.iters, "seed": args.seed,
                     "budget_s": args.budget_s, "skip": sorted(args.skip), "traces": args.traces,
                     "replay_layout": args.replay_layout, "replay_max_cycles": args.replay_max_cycles,
                     "gpu_defaults": GPU_DEFAULTS.as_dict(), "verify_buckets": list(VERIFY_BUCKETS),
                     "timing": clock.kind,
                     "prompt": "uniform random token ids (seeded), EOS disabled, greedy"},
        "traces_status": trace_status, "spec_anchors_h200": SPEC_ANCHORS_H200, "pairs": {}, "errors": [],
    }

    def save():
        results["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        results["table"] = table(results)
        out_path.write_text(json.dumps(results, indent=1))

    def budget_left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    specs = TINY_PAIRS if args.tiny else REAL_PAIRS
    # no_grad, not inference_mode, around everything: HF generate + torch.compile see ordinary tensors; the stages
    # that drive our runners directly enter inference_mode themselves (ouroboros.generate does so too)
    with torch.no_grad():
        for pi, name in enumerate(args.pairs):
            pair = {"settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens}, "columns": {}}
            results["pairs"][name] = pair
            if budget_left() <= 0:
                pair["skipped"] = "time budget used up"
                save()
                continue
            target = draft = None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                t0 = time.perf_counter()
                (tname, tspec), (dname, dspec) = specs[name]["target"], specs[name]["draft"]
                target = build_model(tspec, dtype, device, args.seed)
                draft = build_model(dspec, dtype, device, args.seed + 1)
                clock.sync()
                pair["build_s"] = round(time.perf_counter() - t0, 2)
                pair["models"] = {"target": model_info(tname, tspec, target), "draft": model_info(dname, dspec, draft)}
            except Exception as err:  # noqa: BLE001
                pair.update(error_record(err))
                results["errors"].append(f"{name}: build: {pair['error']}")
                save()
                target = draft = None   # noqa: F841
                free_memory()
                continue
            vocab = tspec["vocab_size"]
            gen = torch.Generator().manual_seed(args.seed + 17 * pi)
            prompt = torch.randint(3, vocab, (args.prompt_len,), generator=gen).tolist()
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            print(f"[{name}] built {tname} + {dname} in {pair['build_s']} s", flush=True)

            def stage(key, fn, need_s=0.0, where=pair["columns"]):
                if key in args.skip:
                    where[key] = {"skipped": "--skip"}
                    return
                if budget_left() < need_s:
                    where[key] = {"skipped": f"time budget ({args.budget_s:.0f} s) would be exceeded"}
                    save()
                    return
                t0 = time.perf_counter()
                try:
                    where[key] = fn()
                    results["errors"].extend(f"{name}: {key}.{path}: {msg}" for path, msg in nested_errors(where[key]))
                except Exception as err:  # noqa: BLE001 - record and go on
                    where[key] = error_record(err)
                    results["errors"].append(f"{name}: {key}: {where[key]['error']}")
                    free_memory()
                where[key]["stage_s"] = round(time.perf_counter() - t0, 2)
                status = where[key].get("error") or where[key].get("decode_tok_s") or "done"
                print(f"[{name}] {key}: {status} ({where[key]['stage_s']} s)", flush=True)
                save()

            stage("hf_static_compile", lambda: col_hf_static_compile(target, ids, args.new_tokens, clock,
                                                                     args.hf_compile),
                  need_s=0 if args.tiny else 60)   # the baseline first: it must not be lost to the budget
            cleanup_compile(target)
            if args.ours_compile:       # the same path without torch.compile, for comparison (first: the compiled
                stage("ours_greedy_nocompile", lambda: col_ours(target, None, ids, args.new_tokens, clock, "greedy",
                                                                compile=False))    # runner then stays for the rest)
            stage("ours_greedy", lambda: col_ours(target, None, ids, args.new_tokens, clock, "greedy"))
            holder = {}
            stage("step_costs", lambda: step_costs(target, draft, prompt, GPU_DEFAULTS, clock, args.iters, vocab,
                                                     args.new_tokens),
                  where=holder)
            pair["step_costs"] = holder.get("step_costs")
            free_memory()
            if "replay" in args.skip:
                pair["replay"] = {"status": "skipped: --skip"}
            elif traces is None:
                pair["replay"] = {"status": trace_status}
            else:
                stage("replay", lambda: replay_stage(target, draft, prompt, vocab, traces, args, clock),
                      where=holder)
                pair["replay"] = holder["replay"]
                pair["replay"].setdefault("status", trace_status)
                free_memory()
            stage("ours_ouroboros_live", lambda: col_ours(target, draft, ids, args.new_tokens, clock, "ouroboros",
                                                          pool_device=device),
                  need_s=0 if args.tiny else 20)
            live = pair["columns"].get("ours_ouroboros_live") or {}
            if "trace" in live:
                stage("live_vs_replay", lambda: live_vs_replay(target, draft, prompt, vocab, live, clock,
                                                               args.new_tokens),
                      need_s=0 if args.tiny else 15, where=holder)
                pair["live_vs_replay"] = holder.get("live_vs_replay")
            stage("hf_eager", lambda: col_hf_eager(target, ids, args.new_tokens, clock),
                  need_s=0 if args.tiny else 30)
            modes = GLUE_MODES if args.glue == "all" else (args.glue,)
            if modes:           # last: fusing repacks the weights (graphs captured before it would go stale)
                reserve = 0 if args.tiny else 150 * (len(args.pairs) - pi - 1)    # the pairs still to run
                stage("glue", lambda: glue_stage(target, draft, prompt, modes, clock, args.iters, vocab,
                                                 args.new_tokens, GPU_DEFAULTS, lambda: budget_left() - reserve),
                      need_s=0 if args.tiny else 45, where=holder)
                pair["glue"] = holder.get("glue")
                merge_glue(pair)
            live = pair["columns"].get("ours_ouroboros_live")
            if isinstance(live, dict) and "stats" in live:
                live["note"] = ("live run of the real fast ouroboros path (device drafting, GPU pool) on the RANDOM "
                                "pair: acceptance ~0, so this shows the path runs and its overhead, not its speedup")
            ref = (pair["columns"].get("hf_eager") or {}).get("output")
            for key, col in pair["columns"].items():
                out = col.get("output") if isinstance(col, dict) else None
                if out is not None and ref is not None and key != "hf_eager":
                    col["prefix_match_vs_hf_eager"] = prefix_match(out, ref)
                    col["exact_match_vs_hf_eager"] = out == ref
            compute_ratios(pair)
            if device.type == "cuda":
                pair["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            save()
            target = draft = None   # noqa: F841 - drop the pair's models before the next pair
            with contextlib.suppress(Exception):
                torch._dynamo.reset()
            free_memory()
    for pair in results["pairs"].values():   # outputs are long; keep only their first tokens
        for col in (pair.get("columns") or {}).values():
            if isinstance(col, dict) and "output" in col:
                col["output_head"] = col.pop("output")[:16]
    save()
    png = None
    if not args.no_plot:
        with contextlib.suppress(Exception):
            png = plot(results, out_path.with_suffix(".png"))
    print(f"wrote {out_path}" + (f" and {png}" if png else " (no PNG: matplotlib missing or --no-plot)"))
    print("\n".join(results["table"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
