"""Report of a ``bench.compile_startup`` JSON: first and warm call per bucket and process, the compile seconds and
the inductor cache counters, and the two processes' totals."""
from __future__ import annotations


def table(result: dict) -> list[str]:
    lines = [f"{'process':<8} {'bucket':>6} {'first s':>9} {'cpu s':>7} {'warm ms':>9} {'compile s':>10} "
             f"{'fx hit/miss':>12} {'aot hit/miss':>13}"]
    for run in result["runs"]:
        if "error" in run:
            lines.append(f"{run['label']:<8} ERROR {run['error']}")
            continue
        for b in run["buckets"]:
            c = b["counters"]
            cpu = "-" if b["first_call_cpu_s"] is None else f"{b['first_call_cpu_s']:.2f}"
            lines.append(f"{run['label']:<8} {b['bucket']:>6} {b['first_call_s']:>9.2f} {cpu:>7} "
                         f"{b['warm_call_s'] * 1e3:>9.2f} "
                         f"{b['compile_s']:>10.2f} {c['fxgraph_cache_hit']:>5}/{c['fxgraph_cache_miss']:<6} "
                         f"{c['autograd_cache_hit']:>6}/{c['autograd_cache_miss']:<6}")
    s = result["summary"]
    if "error" not in s:
        lines.append(f"compile total: first process {s['first_process_compile_s']:.2f} s, second process "
                     f"{s['second_process_compile_s']:.2f} s ({s['speedup']}x); cache hit: {s['cache_hit']}")
    return lines


lines = table
