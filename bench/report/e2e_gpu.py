"""Report of a ``bench.e2e_gpu`` JSON: the table (columns, replayed methods, step costs, kernels and ms per forward,
the live cycle's probes, live vs replay) and a PNG of decode tokens/s per column and replayed method."""
from __future__ import annotations

from pathlib import Path

from bench.report.plotting import pyplot


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
                         for m in _modes(row)]
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



def _modes(row: dict) -> list[str]:
    """The runner modes of a kernels-per-forward row besides the lean floor, in the order they were measured."""
    return [m for m in row if m != "lean" and not m.endswith("_vs_lean")]


def lines(results: dict) -> list[str]:
    return table(results)


def draw(results: dict, path: Path) -> bool:
    """The PNG of decode tokens/s per column and replayed method, one panel per pair; False without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
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
    return True
