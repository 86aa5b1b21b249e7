"""F.linear vs the small-M path of ``ouroboros.hf.cpu_linear`` on this CPU, for the real pair's weight shapes.

    python -m bench.cpu_linear [--out bench/results/cpu_small_m_linear.json] [--threads 2]
    python -m bench.report bench/results/cpu_small_m_linear.json      # the table of a result
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from ouroboros.hf.cpu_linear import linear as small_m

from bench.common import RESULTS, utc_now, write_json
from bench.report.cpu_linear import row_line

SHAPES = {"mlp_up (8960x1536)": (8960, 1536), "mlp_down (1536x8960)": (1536, 8960),
          "lm_head (151936x1536)": (151936, 1536)}


def ms_per_call(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(RESULTS / "cpu_small_m_linear.json"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    with torch.inference_mode():
        for name, (o, i) in SHAPES.items():
            w = torch.randn(o, i)
            n = 5 if o > 100_000 else 10
            for m in (1, 4, 9, 16, 32, 64):
                x = torch.randn(m, i)
                base = ms_per_call(lambda: F.linear(x, w), n)
                ours = ms_per_call(lambda: small_m(x, w), n)
                rows.append({"weight": name, "rows": m, "f_linear_ms": round(base, 3), "small_m_ms": round(ours, 3),
                             "speedup": round(base / ours, 2)})
                print(row_line(rows[-1]))
    write_json(args.out, {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                      "torch": torch.__version__},
                          "dtype": "float32", "date_utc": utc_now(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
