"""Report of a ``bench.e2e`` JSON (one run, a parameter sweep, or a temperature sweep): the table per run, and a PNG
of the speedup over the HF baseline per method (a temperature sweep: a line per method against temperature)."""
from __future__ import annotations

from pathlib import Path

from bench.e2e_summary import BASELINES, HF_METHODS, base_method, speedup_of
from bench.report.plotting import pyplot


def table(summary: dict) -> str:
    rows = [f"{'method':18s} {'tok/s':>7s} {'speedup':>8s} {'acc/fwd':>8s} {'tgt fwd':>8s} {'drf fwd':>8s} "
            f"{'==greedy':>8s}"]
    for m, s in summary.items():
        acc = s.get("accepted_per_target_forward")
        ident = s.get("identical_to_hf_greedy")
        rows.append(f"{m:18s} {s['tokens_per_s']:7.2f} {speedup_of(s):7.2f}x "
                    f"{acc if acc is not None else float('nan'):8.2f} {s['target_forwards']:8d} "
                    f"{s['draft_forwards']:8d} {'' if ident is None else f'{ident:.0%}':>8s}")
    return "\n".join(rows)



def plot_title(meta: dict) -> str:
    """The PNG title of an e2e run, from its JSON metadata."""
    m = meta["machine"]
    title = (f"{meta['pair']} {meta['dtype']} (draft quant {meta.get('draft_quant', 'none')}) on {m['cpu']} "
             f"({m['torch_threads']} threads), {meta['dataset']} {meta['n_prompts']} prompts x "
             f"{meta['max_new_tokens']} new tokens")
    s = meta.get("sampling")
    if s:
        temps = "T " + ",".join(f"{t:g}" for t in meta["temperatures"]) if meta.get("temperatures") else \
            f"T={s['temperature']:g}"
        title += f"\nsampling {temps}, top_p={s['top_p']:g}, top_k={s['top_k']}, seed {s['seed']}+prompt index"
    return title



def lines(data: dict) -> list[str]:
    """The table of each run in the file (a temperature sweep: one per temperature, headed by it)."""
    if "per_temperature" in data:
        out = []
        for temp, run in data["per_temperature"].items():
            out += [f"temperature {temp}", *table(run["summary"]).splitlines()]
        return out
    return table(data["summary"]).splitlines()


def draw(data: dict, path: Path) -> bool:
    if "per_temperature" in data:
        return plot_temperatures(data["per_temperature"], plot_title(data), path)
    return plot(data["summary"], plot_title(data), path)


def plot(summary: dict, title: str, path: Path) -> bool:
    """Bars of the speedup over the run's HF baseline per method, with tokens/s and accepted tokens per forward."""
    plt = pyplot()
    if plt is None:
        return False
    names = list(summary)
    speed = [speedup_of(summary[m]) for m in names]
    colors = ["#999999" if m in HF_METHODS else "#4c72b0" if not m.startswith("ouroboros") else "#dd8452"
              for m in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    bars = ax.bar(names, speed, color=colors)
    for b, m in zip(bars, names):
        s = summary[m]
        acc = s.get("accepted_per_target_forward")
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(),
                f"{s['tokens_per_s']:.2f} tok/s\n{acc:.2f} acc/fwd" if acc else f"{s['tokens_per_s']:.2f} tok/s",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel(f"speedup over {BASELINES[base_method(names)]}")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(speed + [1.0]) * 1.25)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_temperatures(runs: dict, title: str, path: Path) -> bool:
    """Speedup over HF's own decoding (greedy at temperature 0, sampling above) against temperature, a line per
    method; ``runs``: temperature (str) -> one run's record with its "summary"."""
    plt = pyplot()
    if plt is None:
        return False
    temps = sorted(runs, key=float)
    methods = [m for m in runs[temps[0]]["summary"] if m not in BASELINES]
    fig, ax = plt.subplots(figsize=(10, 5))
    for m in methods:
        ys = [speedup_of(runs[t]["summary"][m]) for t in temps]
        ax.plot([float(t) for t in temps], ys, marker="o", label=m,
                ls="--" if m in HF_METHODS else "-", color="#999999" if m in HF_METHODS else None)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("temperature (0 = greedy)")
    ax.set_ylabel("speedup over HF generate (same decoding)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True

