"""Benchmarks of ouroboros, run as modules from the repository root (``python -m bench.<name> ...``).

Each benchmark measures and writes JSON; tables and PNGs come from the report step (``python -m bench.report
FILE.json``), which reads only that JSON, so a GPU run is re-reported on any machine. ``bench/results/README.md``
indexes every committed result.

Measuring modules:
  attention        tree-attention microbenchmark (ours vs SDPA vs flex vs the byte floor), issue 16
  ngram            phrase lookup + insert per draft step: the CPU dict pool vs the device pool
  cpu_linear       F.linear vs the small-M CPU linear on the real pair's weight shapes
  compile_startup  first-call compile time of the compiled fast path, cold and from inductor's caches
  e2e              the real pair on real prompts against every baseline (CPU and GPU), with per-cycle traces
  forward_costs    one forward's cost by tree size on the real pair (``python -m bench.e2e --forward-costs``)
  e2e_gpu          random-weight models with the real configs on a GPU: columns, step costs, replayed traces
  cost_model       the GPU layout's cost model: inputs, validation, choice (refits the package data)
  lean_decoder     a gpt-fast-style decoder: the floor a step of the fast path is measured against
Their parts: common (paths, machine, versions, JSON), clock (timing), traces (trace files), e2e_methods /
e2e_setup / e2e_summary / e2e_files (the e2e benchmark's generation runs, plan, summaries, merge), e2e_gpu_models /
e2e_gpu_columns / e2e_gpu_steps / e2e_gpu_probes / e2e_gpu_replay (the GPU benchmark's models, columns, step costs,
probes, replay); ``bench.report`` with one module per result kind.
"""
