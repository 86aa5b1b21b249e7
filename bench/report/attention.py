"""Report of a ``bench.attention`` JSON: a line per shape (ours with an int / a device length, SDPA, flex, the byte
floor, in us), the issue-16 targets, and a PNG of us against tree size per head layout and cache length."""
from __future__ import annotations

from pathlib import Path

from bench.report.plotting import pyplot

PAIR_HEADS = [(12, 2, 128), (14, 2, 64)]          # Qwen2.5-Coder-1.5B target, 0.5B draft: (Hq, Hkv, D)


def _fmt(x):
    return "   -   " if x is None else f"{x:7.1f}"


def _best(r, backends):
    xs = [r.get(f"ours_{b}") for b in backends if r.get(f"ours_{b}") is not None]
    return min(xs) if xs else None


def row_line(r: dict, backends, has_flex: bool) -> str:
    """One shape: ours (int length / device length) per backend, SDPA, SDPA with the mask, flex, the floor, in us."""
    cols = " ".join(f"{b}={_fmt(r.get(f'ours_{b}'))}/{_fmt(r.get(f'ours_{b}_dev'))}" for b in backends)
    best = _best(r, backends)
    ratio = lambda a, b: f"{a / b:5.2f}x" if a and b else "  -  "  # noqa: E731
    return (f"{r['H']:2d}/{r['Hkv']:2d} D={r['D']:3d} L={r['L']:5d} T={r['T']:4d} | ours int/dev: {cols} | "
            f"sdpa={_fmt(r['sdpa_nomask'])} sdpa_mask={_fmt(r['sdpa_mask'])} "
            f"flex={_fmt(r.get('flex')) if has_flex else '  off  '} floor={_fmt(r['floor'])} us | "
            f"ours/sdpa={ratio(best, r['sdpa_nomask'])} ours/floor={ratio(best, r['floor'])}")


def targets(rows, backends) -> list[dict]:
    """The issue-16 targets, one entry per checked row: CUDA at the stated times, Triton at 1.5x them; both faster
    than SDPA without a mask (T = 1: no slower). Timed on the fast path's form (device length, ``ours_<b>_dev``)."""
    out = []
    for r in rows:
        pair = (r["H"], r["Hkv"], r["D"]) in PAIR_HEADS
        if (r["H"], r["Hkv"], r["D"]) == (32, 8, 128) and r["L"] == 2048 and r["T"] == 64:
            limit = 20.0
        elif pair and r["L"] <= 1024 and r["T"] <= 64:
            limit = 8.0
        elif r["T"] == 1:
            limit = None                      # only: no slower than SDPA without a mask
        else:
            continue
        for b in backends:
            us = r.get(f"ours_{b}_dev")
            if us is None:
                continue
            scale = 1.5 if b == "triton" else 1.0
            vs_sdpa = us <= r["sdpa_nomask"] * scale if r["T"] == 1 else us < r["sdpa_nomask"] * scale
            ok = vs_sdpa and (limit is None or us <= limit * scale)
            out.append(dict(shape=f"{r['H']}/{r['Hkv']} D={r['D']} L={r['L']} T={r['T']}", backend=b, us=us,
                            limit_us=None if limit is None else limit * scale, sdpa_nomask_us=r["sdpa_nomask"],
                            met=bool(ok)))
    return out



def target_lines(checks: list[dict]) -> list[str]:
    out = ["", "Targets (issue 16; Triton: times x 1.5; measured with the device length):"]
    for c in checks:
        limit = f"<= {c['limit_us']:.1f} us and " if c["limit_us"] is not None else ""
        out.append(f"  {'met ' if c['met'] else 'MISS'} {c['backend']:6s} {c['shape']:28s} {c['us']:7.1f} us "
                   f"({limit}vs SDPA no mask {c['sdpa_nomask_us']:.1f} us)")
    missed = [c for c in checks if not c["met"]]
    out.append(f"  {len(checks) - len(missed)} of {len(checks)} targets met")
    return out


def backends_of(data: dict) -> list[str]:
    return list((data.get("settings") or {}).get("backends")
                or dict.fromkeys(k[5:] for r in data["rows"] for k in r if k.startswith("ours_")
                                 and not k.endswith("_dev")))


def lines(data: dict) -> list[str]:
    """A line per shape, then the targets (as recorded, or computed from the rows for files that lack them)."""
    backends = backends_of(data)
    has_flex = any("flex" in r for r in data["rows"])
    checks = data.get("targets")
    if checks is None:
        checks = targets(data["rows"], backends)
    return [f"card: {data.get('card')}; backends: {backends}",
            *(row_line(r, backends, has_flex) for r in data["rows"]), *target_lines(checks)]


def draw(data: dict, path: Path) -> bool:
    """us (median) against tree size, a panel per head layout and cache length; False without matplotlib."""
    rows, backends, card = data["rows"], backends_of(data), data.get("card", "?")
    plt = pyplot()
    if plt is None:
        return False
    heads = list(dict.fromkeys((r["H"], r["Hkv"], r["D"]) for r in rows))
    Ls = sorted({r["L"] for r in rows})
    fig, axes = plt.subplots(len(heads), len(Ls), figsize=(4 * len(Ls), 3.2 * len(heads)), squeeze=False)
    keys = [f"ours_{b}{s}" for b in backends for s in ("", "_dev")] + ["sdpa_nomask", "sdpa_mask", "flex", "floor"]
    for i, hh in enumerate(heads):
        for j, L in enumerate(Ls):
            ax = axes[i][j]
            sel = sorted((r for r in rows if (r["H"], r["Hkv"], r["D"]) == hh and r["L"] == L), key=lambda r: r["T"])
            for key in keys:
                pts = [(r["T"], r[key]) for r in sel if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=key, linestyle="--" if key == "floor" else "-")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"Hq/Hkv={hh[0]}/{hh[1]} D={hh[2]} L={L}", fontsize=9)
            ax.set_xlabel("T (tree tokens)")
            ax.set_ylabel("us (median)")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"tree attention, {(data.get('settings') or {}).get('dtype', 'bfloat16')}, {card}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
