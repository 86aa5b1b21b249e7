"""``python -m bench.report FILE.json [FILE.json ...] [--no-plot] [--out-dir DIR]``: see ``bench.report``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import kind_of, report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    ap.add_argument("files", nargs="+", type=Path, help="benchmark JSON files")
    ap.add_argument("--no-plot", action="store_true", help="tables only, no PNG")
    ap.add_argument("--out-dir", type=Path, default=None, help="write the PNGs here (default: beside each JSON)")
    args = ap.parse_args(argv)
    status = 0
    for i, path in enumerate(args.files):
        try:
            if len(args.files) > 1:
                print(("\n" if i else "") + f"== {path} ({kind_of(json.loads(path.read_text()))})")
            png = None if args.out_dir is None else args.out_dir / path.with_suffix(".png").name
            if png is not None:
                png.parent.mkdir(parents=True, exist_ok=True)
            lines, drawn = report(path, plot=not args.no_plot, png=png)
        except (OSError, ValueError, KeyError, TypeError) as err:
            print(f"{path}: cannot report: {type(err).__name__}: {err}", file=sys.stderr)
            status = 1
            continue
        if drawn:
            print(f"wrote {drawn}")
        print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
