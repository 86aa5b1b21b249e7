"""Benchmark scripts run end to end on a CPU in their tiny modes and write the JSON they promise; the report step
reads every committed result; bench/results/README.md indexes every file there."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import ouroboros
import pytest
import torch
from ouroboros.core.buckets import bucket as _bucket

from bench import e2e, e2e_files, e2e_gpu, e2e_gpu_models
from bench import traces as bench_traces
from bench.report import kind_of, report

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"


def _env() -> dict:
    """The parent's environment minus TRITON_INTERPRET (conftest sets it; the interpreter would make the CPU run
    crawl, and the script's CPU path is the reference backend)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _cycle(tree, acc, fwd=0, dlen=0):
    return {"tree_size": tree, "accepted": acc, "verified": acc, "draft_len": dlen, "draft_forwards": fwd}


def _traces() -> dict:
    """A small file in the real-models benchmark's format (``bench.e2e`` writes traces/<dataset>.json)."""
    ouro = [_cycle(15, 4, 3, 6), _cycle(17, 9, 4, 8), _cycle(12, 1, 2, 3), _cycle(20, 6, 5, 10)]
    return {"what": "test", "methods": {
        "greedy": {"resolved_params": None, "prompts": [{"trace": [_cycle(1, 1)] * 5}]},
        "speculative": {"resolved_params": None, "prompts": [{"trace": [_cycle(9, 3, 8, 8), _cycle(9, 9, 8, 8)]}]},
        "ouroboros": {"resolved_params": {"gamma": 8, "ngram": 5, "window": 3, "guess_set": 4, "topk": 2},
                      "prompts": [{"trace": ouro}, {"trace": ouro[:2]}]},
    }}


def test_e2e_gpu_tiny_end_to_end(tmp_path):
    traces = tmp_path / "traces.json"
    traces.write_text(json.dumps(_traces()))
    out = tmp_path / "e2e_gpu.json"
    cmd = [sys.executable, "-m", "bench.e2e_gpu", "--tiny", "--traces", str(traces), "--out", str(out), "--iters", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "REPLAYED ouroboros" in proc.stdout.splitlines()[-1] or "REPLAYED ouroboros" in proc.stdout

    data = json.loads(out.read_text())
    assert data["schema"] == "ouroboros.e2e_gpu/1" and data["tiny"] is True
    assert data["card"] == "cpu" and data["versions"]["torch"] == torch.__version__
    assert data["versions"]["transformers"]
    gpu = ouroboros.GPU_DEFAULTS
    assert data["settings"]["dtype"] == "float32" and data["settings"]["gpu_defaults"] == gpu.as_dict()
    assert data["errors"] == [], data["errors"]
    assert set(data["pairs"]) == {"qwen", "llama"}
    for name, pair in data["pairs"].items():
        cols = pair["columns"]
        for key in ("hf_eager", "hf_static_compile", "ours_greedy", "ours_ouroboros_live"):
            assert cols[key]["decode_tok_s"] > 0 and cols[key]["e2e_tok_s"] > 0, (name, key, cols[key])
        # float32: every greedy path emits HF's own greedy tokens
        for key in ("hf_static_compile", "ours_greedy", "ours_ouroboros_live"):
            assert cols[key]["exact_match_vs_hf_eager"] is True, (name, key)
        assert cols["hf_static_compile"]["compiled"] is False        # no torch.compile on a CPU run
        steps = pair["step_costs"]
        assert set(steps["target_verify_device"]) == {"1", "16", "32", "64", "128"}
        assert all(v > 0 for v in steps["target_verify_device"].values())
        logical = 1 + (gpu.window + gpu.guess_set) * (gpu.ngram - 1)
        assert steps["draft_layout"]["tokens_logical"] == logical
        assert steps["draft_layout"]["tokens_bucket"] == _bucket(logical) and steps["draft_layout"]["full_step_ms"] > 0
        for key in ("kv_gather_14_slots", "keep_gather_plus_rollback_host", "gpu_pool_lookup",
                    "gpu_pool_insert_window", "host_tree_build_mask_walk"):
            assert steps["bookkeeping"][key] > 0, key
        replay = pair["replay"]["methods"]
        assert set(replay) == {"greedy", "speculative", "ouroboros", "ouroboros@trace_layout", "greedy_synthetic"}
        # ouroboros replays run the live path's code (DeviceCycle.replay): N + 1 pending slots in the first forward,
        # a trunk of at most the adaptive maximum of gamma, plus one suffix of N - 1 tokens kept
        trace_layout = replay["ouroboros@trace_layout"]
        assert trace_layout["draft_layout"]["tokens_logical"] == (5 + 1) + (3 + 4) * 4
        assert trace_layout["accepted_tokens"] == 4 + 9 + 1 + 6 + 4 + 9         # every record fits that layout
        assert trace_layout["path"].startswith("DeviceCycle.replay") and trace_layout["cycles"] == 6
        rec = replay["ouroboros"]
        assert rec["replayed"] is True and rec["kind"] == "ouroboros" and rec["cycles"] == 6
        assert 6 <= rec["accepted_tokens"] <= 4 + 9 + 1 + 6 + 4 + 9        # capped by the GPU layout's tree
        assert replay["speculative"]["accepted_tokens"] == 12 and replay["greedy"]["accepted_tokens"] == 5
        for rec in replay.values():
            assert rec["tok_s"] > 0 and rec["vs_hf_static_compile"] > 0 and rec["vs_ours_greedy"] > 0
        assert pair["ratios"]["replayed_ouroboros_vs_hf_static_compile"] == replay["ouroboros"]["vs_hf_static_compile"]
    assert any(line.startswith("REPLAYED ouroboros") for line in data["table"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert out.with_suffix(".png").stat().st_size > 0


def test_e2e_gpu_trace_formats(tmp_path):
    m = bench_traces
    traces, status = m.load_traces(tmp_path / "missing.json")
    assert traces is None and "not found" in status
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert m.load_traces(bad)[0] is None
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"methods": {"x": {"prompts": []}}}))
    assert m.load_traces(empty)[0] is None
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([_cycle(5, 2, 1, 3), _cycle(1, 1), {"junk": 1}]))
    traces, _ = m.load_traces(plain)
    assert list(traces) == ["trace"] and len(traces["trace"]["prompts"][0]) == 2
    full = tmp_path / "full.json"
    full.write_text(json.dumps(_traces()))
    traces, _ = m.load_traces(full)
    assert set(traces) == {"greedy", "speculative", "ouroboros"}
    assert [len(p) for p in traces["ouroboros"]["prompts"]] == [4, 2]
    assert traces["ouroboros"]["resolved_params"]["window"] == 3


def test_e2e_gpu_missing_traces_skips_replay(tmp_path, capsys):
    out = tmp_path / "e2e_gpu.json"
    assert e2e_gpu.main(["--tiny", "--pairs", "llama", "--traces", str(tmp_path / "none.json"), "--out", str(out),
                   "--no-plot", "--skip", "hf_eager,hf_static_compile,ours_ouroboros_live,step_costs"]) == 0
    assert "replay: traces file not found" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "not found" in data["pairs"]["llama"]["replay"]["status"]
    assert data["pairs"]["llama"]["columns"]["ours_greedy"]["decode_tok_s"] > 0
    assert data["pairs"]["llama"]["columns"]["hf_eager"] == {"skipped": "--skip"}


def test_e2e_gpu_real_configs_have_the_real_sizes():
    """The configs written in the script build models of the checkpoints' parameter counts (on the meta device)."""
    m = e2e_gpu_models
    expected = {"Qwen2.5-Coder-1.5B": 1.54e9, "Qwen2.5-Coder-0.5B": 0.494e9, "Llama-2-7B": 6.74e9,
                "TinyLlama-1.1B": 1.10e9}
    for pair in m.REAL_PAIRS.values():
        for name, spec in pair.values():
            model = m.build_model(spec, torch.bfloat16, torch.device("meta"), 0)
            n = sum(p.numel() for p in model.parameters())
            assert abs(n - expected[name]) / expected[name] < 0.01, (name, n)
    q = m.REAL_PAIRS["qwen"]["target"][1]
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"],
            q["intermediate_size"], q["vocab_size"], q["tie_word_embeddings"]) == (1536, 28, 12, 2, 8960, 151936, True)


def _e2e_part(offset: int, n: int, seconds: float) -> dict:
    """A minimal ``bench.e2e`` JSON: HF greedy and ouroboros over prompts offset..offset+n-1."""
    def rec(i, secs):
        return {"tokens": 10, "seconds": secs, "target_forwards": 10, "target_tokens_in": 10, "draft_forwards": 0,
                "draft_tokens_in": 0, "output": [i] * 10}
    per = {"hf_greedy": [rec(offset + i, seconds) for i in range(n)],
           "ouroboros": [rec(offset + i, seconds / 2) for i in range(n)]}
    return {"pair": "p", "dtype": "float32", "dataset": "gsm8k", "max_new_tokens": 10, "prompt_format": "chat",
            "draft_quant": "int8", "ouroboros_params_override": {}, "offset": offset, "n_prompts": n,
            "prompt_tokens": [5] * n, "date_utc": "now", "loadavg_start_end": [[0, 0, 0], [1, 1, 1]],
            "machine": {"cpu": "cpu", "torch_threads": 1},
            "per_method": {k: {"per_prompt": v, "params": {}, "loadavg": [[0, 0, 0]] * n} for k, v in per.items()}}


def test_e2e_merge_joins_consecutive_prompt_ranges(tmp_path):
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "ab.json"
    a.write_text(json.dumps(_e2e_part(0, 3, 4.0)))
    b.write_text(json.dumps(_e2e_part(3, 2, 2.0)))
    e2e_files.merge([str(b), str(a)], out)
    data = json.loads(out.read_text())
    assert data["n_prompts"] == 5 and [p["offset"] for p in data["merged_from"]] == [0, 3]
    assert [r["output"][0] for r in data["per_method"]["ouroboros"]["per_prompt"]] == [0, 1, 2, 3, 4]
    s = data["summary"]
    assert s["hf_greedy"]["seconds"] == 16.0 and abs(s["ouroboros"]["speedup_vs_hf_greedy"] - 2.0) < 1e-9
    assert s["ouroboros"]["identical_to_hf_greedy"] == 1.0
    b.write_text(json.dumps(_e2e_part(4, 2, 2.0)))          # a gap: prompt 3 missing
    with pytest.raises(SystemExit, match="not followed"):
        e2e_files.merge([str(a), str(b)], out)


def test_e2e_sampling_runs_on_the_small_pair(tmp_path):
    """--do-sample and the --temperatures sweep end to end on the small random pair (1 prompt, a few tokens)."""
    small = ["--pair", "small", "--n-prompts", "1", "--max-new-tokens", "6", "--top-p", "0.95", "--seed", "5"]
    one = tmp_path / "one.json"
    assert e2e.main(small + ["--do-sample", "--temperature", "0.7", "--methods", "speculative", "--out", str(one)]) == 0
    data = json.loads(one.read_text())
    assert data["sampling"] == {"temperature": 0.7, "top_p": 0.95, "top_k": 50, "seed": 5}
    assert list(data["summary"]) == ["hf_sample", "speculative"]
    assert data["summary"]["hf_sample"]["speedup_vs_hf_sample"] == 1
    assert "identical_to_hf_greedy" not in data["summary"]["speculative"]          # sampling: no exactness to check
    assert (tmp_path / "traces" / "synthetic_t0.7.json").exists()          # the traces folder beside the JSON

    temps = tmp_path / "temps.json"
    methods = ["hf_assisted", "speculative_ds", "ouroboros_warm"]
    assert e2e.main(small + ["--temperatures", "0,0.7", "--methods", ",".join(methods), "--out", str(temps)]) == 0
    data = json.loads(temps.read_text())
    assert data["temperatures"] == [0.0, 0.7] and data["sampling"]["temperature"] is None
    runs = data["per_temperature"]
    assert list(runs) == ["0", "0.7"] and runs["0.7"]["sampling"]["temperature"] == 0.7
    for run in runs.values():
        summary = run["summary"]
        assert list(summary) == ["hf_sample", *methods]
        for row in summary.values():
            assert 0 < row["tokens"] <= 6 and row["speedup_vs_hf_sample"] > 0 and row["target_forwards"] > 0
        assert summary["hf_assisted"]["draft_forwards"] > 0 and summary["speculative_ds"]["draft_forwards"] > 0
    for m in methods:                                  # temperature 0 is greedy: every method is HF's greedy text
        assert runs["0"]["summary"][m]["identical_to_hf_greedy"] == 1.0
    assert set(data["speedup_vs_temperature"]) == {"hf_sample", *methods}
    assert all(len(v) == 2 for v in data["speedup_vs_temperature"].values())
    if importlib.util.find_spec("matplotlib") is not None:
        assert one.with_suffix(".png").stat().st_size > 0 and temps.with_suffix(".png").stat().st_size > 0
    before = runs["0.7"]["summary"]["ouroboros_warm"]["tokens_per_s"]
    e2e_files.resummarize(temps)                       # recomputed from the per-prompt records alone
    again = json.loads(temps.read_text())["per_temperature"]["0.7"]["summary"]
    assert again["ouroboros_warm"]["tokens_per_s"] == before


def test_e2e_gpu_reads_several_trace_files(tmp_path):
    """A comma list of trace files (HumanEval and GSM8K): every label gets its file's data set as prefix."""
    m = bench_traces
    paths = []
    for name in ("humaneval", "gsm8k"):
        path = tmp_path / f"traces_{name}.json"
        path.write_text(json.dumps({**_traces(), "dataset": name}))
        paths.append(str(path))
    traces, status = m.load_trace_files(",".join(paths))
    assert {"humaneval/ouroboros", "gsm8k/ouroboros", "gsm8k/speculative"} <= set(traces)
    assert traces["gsm8k/ouroboros"] == m.load_traces(Path(paths[1]))[0]["ouroboros"]
    assert status.count("loaded") == 2


def test_gpu_check_script_parses():
    """The one-command GPU check is valid bash (its CPU dry run, ``DRY_RUN=1 bash bench/gpu_check.sh``, runs the
    e2e benchmark's tiny mode, which the tests above cover)."""
    proc = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_bench_is_a_package_run_as_modules():
    """Benchmarks import each other as ``bench.*`` (run as ``python -m bench.<name>`` from the repository root): no
    sys.path edits and no loading by path anywhere in bench/ or the tests."""
    assert importlib.util.find_spec("bench").origin == str(ROOT / "bench" / "__init__.py")
    hack = re.compile(r"sys\.path\.(insert|append)|spec_from_file_location")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "bench").rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if hack.search(line)]
    found += [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "tests").rglob("*.py") if p != Path(__file__)
              for i, line in enumerate(p.read_text().splitlines(), 1) if hack.search(line) and "bench" in line]
    assert found == []


def test_measuring_modules_draw_nothing():
    """Plots and tables live in bench/report/: no measuring module imports matplotlib."""
    found = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py")
             if re.search(r"^\s*(import|from) matplotlib", p.read_text(), re.M)]
    assert found == []


RESULT_SUFFIXES = (".json", ".jsonl", ".png", ".md", ".txt", "/")


def _result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.relative_to(RESULTS).as_posix() != "README.md")


def test_results_readme_indexes_every_file_and_folder():
    """bench/results/README.md names every file (as `path` relative to bench/results) and every folder (`path/`)."""
    index = (RESULTS / "README.md").read_text()
    named = set(re.findall(r"`([^`]+)`", index))
    missing = [p.relative_to(RESULTS).as_posix() + ("/" if p.is_dir() else "") for p in _result_files()]
    missing = [m for m in missing if m not in named]
    assert missing == [], f"not indexed in bench/results/README.md: {missing}"
    here = [n for n in named if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", n) and n.endswith(RESULT_SUFFIXES)
            and ("/" not in n.rstrip("/") or (RESULTS / n.split("/")[0]).is_dir())]    # paths inside bench/results
    stale = [n for n in here if not (RESULTS / n).exists()]
    assert stale == [], f"bench/results/README.md names files that are not there: {stale}"


def test_every_committed_result_is_reported():
    """The report step reads every JSON in bench/results (GPU runs included, here on a CPU) into a table."""
    kinds = {}
    for path in (p for p in _result_files() if p.suffix == ".json"):
        lines, png = report(path, plot=False)
        assert lines and png is None, path
        kinds[path.relative_to(RESULTS).as_posix()] = kind_of(json.loads(path.read_text()))
    assert kinds["gpu_h200_run1/e2e_gpu.json"] == "e2e_gpu" and kinds["gpu_h200_run1/attention.json"] == "attention"
    assert kinds["traces/humaneval_gpu_layout.json"] == "traces"
    assert sorted(k for k, v in kinds.items() if v == "generic") == ["ablation/ablation_cpu.json", "cost_model.json",
                                                                         "cpu_tuning.json", "vllm_proposer_cost_cpu.json",
                                                                         "vllm_replay_continuations.json",
                                                                         "vllm_replay_cpu.json", "vllm_serving_cpu.json",
                                                                         "vllm_serving_k_cpu.json"]


def test_report_cli_redraws_a_gpu_run_on_a_cpu(tmp_path):
    """``python -m bench.report`` on the H200 run's JSON: the table it recorded, and a PNG where asked."""
    src = RESULTS / "gpu_h200_run1" / "e2e_gpu.json"
    cmd = [sys.executable, "-m", "bench.report", str(src), "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads(src.read_text())["table"]
    assert proc.stdout.splitlines()[-len(table):] == table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "e2e_gpu.png").stat().st_size > 0
