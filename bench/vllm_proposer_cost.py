"""Where a vLLM step's time goes with ouroboros' draft mode: the proposer's own seconds against the wall time.

Run in the vLLM environment from the repository root, multiprocessing off (the proposer must live in this process
to be timed), one configuration per process::

    VLLM_ENABLE_V1_MULTIPROCESSING=0 python -m bench.vllm_proposer_cost --draft-vocab 0 \\
        --out bench/results/vllm_proposer_cost_cpu.json

It serves ``--n-prompts`` requests at once per data set (greedy, ``--max-new-tokens`` each) with
:class:`TimedProposer` (our proposer with a clock around ``propose``) and records the wall time, the proposer's
seconds, its calls (engine steps) and the tokens. Each run is added to the JSON under its configuration's name, so
configurations run one after another land in one file.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from bench.common import machine_info, utc_now, write_json
from bench.vllm_serving import encoded_prompts, pair_parser
from ouroboros.vllm import OuroborosProposer

__all__ = ["TimedProposer", "main"]


class TimedProposer(OuroborosProposer):
    """:class:`OuroborosProposer` whose ``propose`` calls are timed (class-level totals: vLLM builds the instance)."""

    seconds = 0.0
    calls = 0
    draft_forwards = 0                   # the draft's batched forwards so far (all runs)
    head_rows = 0                        # the draft head's rows after the last step (0: the whole vocabulary)

    def propose(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super().propose(*args, **kwargs)
        finally:
            TimedProposer.seconds += time.perf_counter() - start
            TimedProposer.calls += 1
            TimedProposer.draft_forwards = self.draft.forwards + self.draft.prefill_forwards
            TimedProposer.head_rows = len(self.draft.head.ids) if self.draft.head is not None else 0


def parse_args(argv=None):
    p = pair_parser(__doc__.splitlines()[0], 64)
    p.add_argument("--draft-vocab", type=int, default=0, help="OUROBOROS_VLLM_DRAFT_VOCAB (0: the whole vocabulary)")
    p.add_argument("--label", default="", help="added to the configuration's name in the JSON (another code version)")
    p.add_argument("--out", default="bench/results/vllm_proposer_cost_cpu.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
        raise SystemExit("set VLLM_ENABLE_V1_MULTIPROCESSING=0: the proposer is timed in this process")
    os.environ.update({"OUROBOROS_VLLM_DRAFT": args.draft, "OUROBOROS_VLLM_DRAFT_VOCAB": str(args.draft_vocab)})
    import vllm  # optional: vllm (the vLLM environment only)
    llm = vllm.LLM(model=args.target, max_model_len=1024, dtype="float32", enforce_eager=True, seed=0,
                   max_num_seqs=args.n_prompts, speculative_config={
                       "method": "custom_class", "model": f"{__name__}.TimedProposer",
                       "num_speculative_tokens": args.k})
    greedy = vllm.SamplingParams(max_tokens=args.max_new_tokens, temperature=0)
    runs = {}
    for dataset in args.datasets.split(","):
        prompts = [vllm.TokensPrompt(prompt_token_ids=p)
                   for p in encoded_prompts(args.target, dataset, args.n_prompts, 0)]
        llm.generate(prompts[:1], vllm.SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)   # warm-up
        TimedProposer.seconds, TimedProposer.calls = 0.0, 0
        forwards = TimedProposer.draft_forwards
        start = time.perf_counter()
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        runs[dataset] = {"wall": round(wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 3),
                         "proposer_seconds": round(TimedProposer.seconds, 3), "steps": TimedProposer.calls,
                         "proposer_per_step": round(TimedProposer.seconds / max(1, TimedProposer.calls), 4),
                         "draft_forwards": TimedProposer.draft_forwards - forwards,
                         "head_rows_at_end": TimedProposer.head_rows}
        print(dataset, runs[dataset], flush=True)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {"configs": {}}
    data.update({"date_utc": utc_now(), "machine": machine_info(), "vllm": vllm.__version__})
    # a head of N > 0 ids also scores the running requests' tokens (ouroboros.vllm.draft_head, since 2026-12-08)
    name = f"draft_vocab={args.draft_vocab}" + ("+history" if args.draft_vocab else "")
    if os.environ.get("OUROBOROS_VLLM_GUESS_SET"):                # another setting of the proposer, from outside
        name += f",guess_set={os.environ['OUROBOROS_VLLM_GUESS_SET']}"
    name += f",{args.label}" if args.label else ""
    data["configs"][name] = {
        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "date_utc": utc_now(), "runs": runs}
    write_json(out, data)


if __name__ == "__main__":
    main()
