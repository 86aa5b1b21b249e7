"""ouroboros inside vLLM's CPU engine (runs in the vLLM environment that `.ci/run` builds; skipped without vllm).

Each engine configuration runs in its own process (vLLM cannot build a second ``LLM`` in a process after some
configurations): this file run as a script serves one configuration and prints its outputs and metrics as JSON.
Tiny random Llama models (head_dim 32, as vLLM's CPU attention needs) are built and saved by the tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SPEC = {"method": "custom_class", "model": "ouroboros.vllm.OuroborosProposer", "num_speculative_tokens": 4}
MARK = "OUROBOROS-VLLM-RESULT "
PROMPTS = ["abcabcabcabcabc", "the cat the cat the cat", "xyz", "hello world, hello world, hello", "q"]


def serve(cfg: dict) -> dict:
    """Generate ``cfg["prompts"]`` with one LLM built from ``cfg``: the outputs for each sampling seed in turn, and
    the speculative-decoding metrics."""
    from vllm import LLM, SamplingParams  # optional: vllm (only in the vLLM environment)
    llm = LLM(model=cfg["model"], speculative_config=cfg.get("spec"), max_model_len=512, dtype="float32",
              enforce_eager=True, max_num_seqs=8, disable_log_stats=False, seed=0)
    out: dict = {"outputs": []}
    for seed in cfg.get("seeds", [None]):
        params = SamplingParams(temperature=cfg.get("temperature", 0.0), seed=seed, max_tokens=cfg.get("tokens", 40),
                                ignore_eos=True)
        gens = llm.generate(cfg["prompts"] * cfg.get("repeat", 1), params, use_tqdm=False)
        out["outputs"].append([list(g.outputs[0].token_ids) for g in gens])
    out["metrics"] = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
    if cfg.get("inspect"):          # in-process engine (no multiprocessing): the proposer itself
        drafter = llm.llm_engine.model_executor.driver_worker.worker.model_runner.drafter
        out["table"] = {"live": len(drafter.table), "created": drafter.table.created, "freed": drafter.table.freed}
    return out


def run(cfg: dict, tmp: Path, env: dict | None = None) -> dict:
    """:func:`serve` in a fresh process with ``env`` added (the proposer's settings)."""
    lib = Path(sys.prefix) / "lib" / "libiomp5.so"
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if lib.is_file():
        full["LD_PRELOAD"] = str(lib)
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, __file__, str(tmp / "cfg.json")], env=full, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith(MARK))
    return json.loads(line[len(MARK):])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(target folder, noisy draft folder, peaked target folder).

    The random target is nearly uniform at temperature 0.7 (its top token has probability ~0.02), so a one-hot
    proposal would be accepted about once in fifty tries and a sampling run could accept none by chance (CI saw 0 of
    1107). The peaked target is the same model with its output head scaled by 20 (same greedy text, top token ~0.8 at
    T=0.7): the sampling test runs on it, where ~17 of ~1160 proposals are accepted and the text still varies with the
    seed."""
    # a submodule, not "vllm": in the main environment this folder itself imports as a namespace package "vllm"
    pytest.importorskip("vllm.config", reason="needs vllm: the vLLM environment .ci/run builds (.venv-vllm)")
    import copy

    import torch
    import transformers
    from conftest import make_tokenizer, noisy_copy
    root = tmp_path_factory.mktemp("vllm_models")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    target = transformers.LlamaForCausalLM(cfg).eval()
    tok = make_tokenizer()
    peaked = copy.deepcopy(target)
    with torch.no_grad():
        peaked.lm_head.weight.mul_(20.0)
    for name, model in (("target", target), ("draft", noisy_copy(target, 0.05)), ("peaked", peaked)):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root / "target", root / "draft", root / "peaked"


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    return run({"model": str(models[0]), "prompts": PROMPTS}, tmp_path_factory.mktemp("plain"))


def _accepted(metrics: dict) -> float:
    return metrics.get("vllm:spec_decode_num_accepted_tokens") or 0


def test_pool_mode_is_greedy_exact_and_accepted_with_multiprocessing_on(models, plain, tmp_path):
    ours = run({"model": str(models[0]), "prompts": PROMPTS, "spec": SPEC}, tmp_path)
    assert ours["outputs"] == plain["outputs"]
    assert _accepted(ours["metrics"]) > 0


def test_draft_mode_is_greedy_exact_and_frees_state_with_multiprocessing_off(models, plain, tmp_path):
    env = {"OUROBOROS_VLLM_DRAFT": str(models[1]), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    ours = run({"model": str(models[0]), "prompts": PROMPTS, "spec": SPEC, "inspect": True, "repeat": 1}, tmp_path,
               env)
    assert ours["outputs"] == plain["outputs"]
    assert _accepted(ours["metrics"]) > 0
    table = ours["table"]           # the last step's requests are freed at the next step, which never comes here
    assert table["created"] >= len(PROMPTS) and table["live"] <= 1 and table["created"] == table["freed"] + table["live"]


def test_draft_mode_with_the_target_as_draft_is_nearly_fully_accepted(models, tmp_path):
    env = {"OUROBOROS_VLLM_DRAFT": str(models[0]), "OUROBOROS_VLLM_DRAFT_QUANT": "none"}
    ours = run({"model": str(models[0]), "prompts": PROMPTS, "spec": SPEC}, tmp_path, env)
    m = ours["metrics"]
    assert _accepted(m) >= 0.9 * m["vllm:spec_decode_num_draft_tokens"]


def test_state_stays_bounded_over_many_requests(models, tmp_path):
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    ours = run({"model": str(models[0]), "prompts": PROMPTS, "spec": SPEC, "inspect": True, "repeat": 8,
                "tokens": 16}, tmp_path, env)
    table = ours["table"]           # 40 requests, at most max_num_seqs = 8 running at once
    assert table["created"] >= 8 * len(PROMPTS) - 8 and table["live"] <= 8
    assert table["created"] == table["freed"] + table["live"]


def test_sampling_runs_and_varies_with_the_seed_as_plain_vllm_does(models, tmp_path):
    """(A repeated seed need not repeat the text: the shared pool has grown, so the proposals, and with them the
    draws vLLM's rejection sampler makes, differ.) Every chain is proposed whole (``POOL_CONFIDENCE=0``): sampled
    text from a random model is rarely what the pools predict, so the confidence cut would leave too few proposals
    to check vLLM's rejection sampler accepting some (the cut has its own tests in test_vllm_proposer_units.py)."""
    cfg = {"model": str(models[2]), "prompts": PROMPTS, "spec": SPEC, "temperature": 0.7, "seeds": [0, 1]}
    ours = run(cfg, tmp_path, {"OUROBOROS_VLLM_POOL_CONFIDENCE": "0"})
    assert ours["outputs"][0] != ours["outputs"][1]
    assert all(len(o) == 40 for o in ours["outputs"][0] + ours["outputs"][1])
    assert _accepted(ours["metrics"]) > 0


if __name__ == "__main__":
    print(MARK + json.dumps(serve(json.loads(Path(sys.argv[1]).read_text()))))
