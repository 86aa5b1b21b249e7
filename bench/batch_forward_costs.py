"""Cost of one batched forward through the engine's own batch path, by rows B and tokens per row T (issue 27).

    python -m bench.batch_forward_costs                       # the real pair (float32 target, int8 draft on CPU)
    python -m bench.batch_forward_costs --pair small --sizes 1,2 --tokens 1,2 --repeats 1

Each row first holds a ``--prefix``-token prompt; each measurement appends a chain of T tokens to every row
(:class:`ouroboros.hf.batch_model.BatchModel.forward`, what the host batch loop pays), then rolls every row back,
so all measurements see the same prefix. The least of ``--repeats`` after one warm-up (the run least disturbed by
other load on a shared machine). Writes
``bench/results/cpu_batch_costs.json`` (``--out``), the table :mod:`ouroboros.tuning.batch_plan` reads (its package
copy: ``--write-data``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from ouroboros.core.tokentree import TokenTree
from ouroboros.hf.batch_model import BatchModel

from bench.common import RESULTS, machine_info, utc_now, write_json
from bench.e2e_setup import load_models

DATA_COPY = Path(__file__).resolve().parents[1] / "python/ouroboros/tuning/data/cpu_batch_costs.json"


def chain(tokens: list[int]) -> TokenTree:
    tree = TokenTree()
    tree.add_path(-1, tokens)
    return tree


@torch.inference_mode()
def measure(model, rows: int, tokens: list[int], prefix: int, repeats: int) -> dict[int, float]:
    """{T: least ms} of one forward of ``rows`` chains of T tokens after ``prefix`` cached tokens per row."""
    gen = torch.Generator().manual_seed(rows)
    vocab = model.config.get_text_config().vocab_size
    batch = BatchModel(model, rows)
    prompt = {r: torch.randint(0, vocab, (prefix,), generator=gen).tolist() for r in range(rows)}
    batch.forward({r: chain(p) for r, p in prompt.items()})
    for r in range(rows):
        batch.keep(r, 0, list(range(prefix)))
    out = {}
    for t in tokens:
        times = []
        for i in range(repeats + 1):
            trees = {r: chain(torch.randint(0, vocab, (t,), generator=gen).tolist()) for r in range(rows)}
            start = time.perf_counter()
            batch.forward(trees)
            if i:                                                   # the first one warms up
                times.append((time.perf_counter() - start) * 1e3)
            for r in range(rows):
                batch.keep(r, prefix, list(range(t)))
                batch.rollback(r, prefix)
            batch.compact(slack=0)
        out[t] = round(min(times), 2)
    return out


def pair_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the pair options the batch benchmarks share: --pair, --dtype, --draft-quant, --threads."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--pair", default="qwen2.5-coder-1.5b/0.5b")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--draft-quant", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return ap


def main(argv: list[str] | None = None) -> dict:
    ap = pair_parser(__doc__)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--tokens", default="1,2,4,8,16,32")
    ap.add_argument("--prefix", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "cpu_batch_costs.json"))
    ap.add_argument("--write-data", action="store_true", help="also write the package copy the planner reads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    target, draft, _tok, _ = load_models(SimpleNamespace(pair=args.pair, dtype=args.dtype,
                                                         draft_quant=args.draft_quant))
    sizes = [int(s) for s in args.sizes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    data = {"machine": machine_info(), "date_utc": utc_now(), "pair": args.pair, "dtype": args.dtype,
            "draft_quant": args.draft_quant, "prefix_tokens": args.prefix, "repeats": args.repeats,
            "label": f"{machine_info()['cpu']}, {torch.get_num_threads()} torch thread(s), {args.pair}, measured",
            "predicted": False, "target_ms": {}, "draft_ms": {}}
    for b in sizes:
        data["target_ms"][str(b)] = {str(t): ms for t, ms in measure(target, b, tokens, args.prefix,
                                                                     args.repeats).items()}
        data["draft_ms"][str(b)] = {str(t): ms for t, ms in measure(draft, b, tokens, args.prefix,
                                                                    args.repeats).items()}
        print(f"B={b}: target {data['target_ms'][str(b)]}  draft {data['draft_ms'][str(b)]}", flush=True)
    write_json(args.out, data)
    if args.write_data:
        write_json(DATA_COPY, {k: data[k] for k in ("label", "predicted", "date_utc", "pair", "prefix_tokens",
                                                    "target_ms", "draft_ms")})
    return data


if __name__ == "__main__":
    main()
