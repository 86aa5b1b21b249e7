"""Probes of the GPU benchmark's step costs: ms and kernels per forward of a runner (ours, and the lean decoder
floor with the same weights), host reads and eager ops per cycle of the live path, and the glue modes.

Kernels per forward: the CUDA profiler on a GPU (graph replays included when it sees them, see
``ouroboros.tuning.probes.cuda_kernels``); on a CPU the dispatcher-level proxy (``ouroboros.tuning.probes.OpCounter``:
aten ops that launch a GPU kernel; our kernels' PyTorch reference twins, tree attention and the fused glue's RMSNorm,
RoPE and SwiGLU, count as the one kernel each stands in for).
"""
from __future__ import annotations

import contextlib

import torch

from bench.clock import Clock, free_memory, ms
from bench.common import error_record
from bench.lean_decoder import LeanDecoder

VERIFY_BUCKETS = (1, 16, 32, 64, 128)
DRAFT_BUCKETS = (1, 16, 64)       # draft forward sizes timed
KERNEL_BUCKETS = (1, 64)          # tree sizes whose kernels per forward are counted (T=1 decode, T=64 verify)
GLUE_MODES = ("none", "fused", "compile")  # --glue all: each (the step costs' "default" is the shipped runner)


def chain_inputs(t: int, vocab: int, device, gen: torch.Generator):
    ids = torch.randint(0, vocab, (1, t), generator=gen).to(device)
    depths = torch.arange(t, device=device)
    bits = torch.ones(t, t, dtype=torch.bool).tril().to(device)
    return ids, depths, bits


def section(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``, or the error (one probe's failure keeps the rest of the step costs)."""
    try:
        out[key] = fn()
    except Exception as err:  # noqa: BLE001
        out[key] = error_record(err)


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



def lean_probe(model, prefix_len: int, buckets, clock: Clock, iters: int) -> dict:
    """The lean decoder floor (bench/lean_decoder.py) with ``model``'s weights: ms by tree size, kernels at
    KERNEL_BUCKETS."""
    longest = max(*buckets, *KERNEL_BUCKETS)
    dec = LeanDecoder.from_hf(model, max_len=prefix_len + longest + 8)
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
                    "structure (<= 1 read per cycle) is checked with the Triton kernels in "
                    "tests/decoding/test_device_cycle.py",
            "device_cycle": getattr(stats, "device_cycle", None), "config": stats.config}



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

