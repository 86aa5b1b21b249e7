"""`python -m ouroboros generate | demo | bench | info` on models saved to disk (no hub)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import VOCAB, Family, hf_greedy, make_model, noisy_copy
from ouroboros.cli import gguf as cli_gguf
from ouroboros.cli.args import sampling_kwargs
from ouroboros.cli.gguf import gguf_parameter_count
from ouroboros.cli.entry import build_parser, main
from ouroboros.cli.pairs import DEFAULT_PAIR, PAIRS
from ouroboros.cli.timing import SpeedUp, TimedRun
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    target = make_model("llama")
    draft = noisy_copy(target, 0.01)
    other_vocab = make_model(Family("LlamaConfig", "LlamaForCausalLM", {"vocab_size": VOCAB + 32}))
    for name, model in (("target", target), ("draft", draft), ("draft_other_vocab", other_vocab)):
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    return root, target, fast


@pytest.mark.parametrize("quant", ["auto", "none", "int8"])
def test_generate_streams_the_greedy_text(model_dirs, capsys, quant):
    root, target, tok = model_dirs
    prompt = "w5 w6 w7 w8 w5 w6 w7 w8 w5"
    assert main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompt", prompt,
                 "--max-new-tokens", "12", "--device", "cpu", "--draft-quant", quant]) == 0
    out = capsys.readouterr().out
    ids = tok(prompt).input_ids
    expected = tok.decode(hf_greedy(target, ids, 12), skip_special_tokens=True)
    assert out.startswith(prompt + " " + expected)           # the prompt echoed, then the continuation
    assert "[ouroboros] 12 tokens" in out and "tokens each" in out


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "backend reference" in out and "available" in out and "torch" in out


def test_demo_on_the_small_pair(capsys, tmp_path):
    assert main(["demo", "--small", "--max-new-tokens", "6", "--repeat", "2", "--json", str(tmp_path / "d.json")]) == 0
    out = capsys.readouterr().out
    assert "identical to transformers' greedy output: yes" in out
    assert "runs each)" in out and "run 2/2" in out and "random weights" in out
    text = out.split("[ouroboros output]\n")[1].split("\n")[0].split()
    assert len(text) == 6 and all(w.isalpha() for w in text)     # decoded to words, not token ids
    record = json.loads((tmp_path / "d.json").read_text())
    assert record["identical_to_transformers_greedy"] and len(record["runs"]) == 4
    assert record["speedup_low"] <= record["speedup_median"] <= record["speedup_high"]


def test_speedup_reports_median_spread_and_busy():
    rounds = [[TimedRun("hf", hf, [], 8), TimedRun("ours", ours, [], 8)] for hf, ours in ((3.0, 1.0), (3.3, 1.0))]
    quiet = SpeedUp.from_rounds(rounds)
    assert str(quiet) == "3.15x (3.00-3.30x over 2 runs each)" and not quiet.busy
    rounds.append([TimedRun("hf", 6.0, [], 8), TimedRun("ours", 1.2, [], 8)])
    assert SpeedUp.from_rounds(rounds).busy                      # one greedy run took twice as long


def test_bench_on_the_small_pair_says_random_weights(capsys):
    assert main(["bench", "--small", "--max-new-tokens", "4", "--methods", "greedy,ouroboros"]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "ouroboros" in out


def test_help_says_what_each_parameter_does(monkeypatch):
    added = []                                  # (parser, flags, help) of every add_argument while building
    add_argument = argparse.ArgumentParser.add_argument

    def recording(self, *flags, **kwargs):
        added.append((self, flags, kwargs.get("help")))
        return add_argument(self, *flags, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "add_argument", recording)
    build_parser()
    parsers = {id(p): p for p, _, _ in added}
    assert {p.prog.split()[-1] for p in parsers.values()} >= {"generate", "demo", "bench", "info"}
    for parser in parsers.values():
        text = parser.format_help()
        assert "SPEC" not in text and "§" not in text, parser.prog
    for parser, flags, text in added:
        assert text, f"{parser.prog} {flags} has no help text"


# ---- errors: one line on stderr, exit code 2, before any model loads ------------------------------------------------
def _cli(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``python -m ouroboros`` in a fresh process with the hub NOT forced offline: a hub lookup would show as a
    network wait (this sandbox cannot reach the hub)."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ouroboros", *argv],
                          capture_output=True, text=True, env=env, timeout=120)
    return proc, time.perf_counter() - start


def _error_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    t, d = str(root / "target"), str(root / "draft")
    gen = ["generate", "--prompt", "w5 w6 w7"]
    cases = {
        "nonexistent-path": (gen + ["--target", "/nonexistent/dir", "--draft", d],
                             "no model directory at /nonexistent/dir"),
        "hub-name": (gen + ["--target", "nope", "--draft", d], "no model 'nope' in the Hugging Face cache"),
        "empty-prompt": (["generate", "--target", t, "--draft", d, "--prompt", ""], "prompt is empty"),
        "max-new-tokens": (gen + ["--target", t, "--draft", d, "--max-new-tokens", "0"], "--max-new-tokens"),
        "missing-draft": (gen + ["--target", t], "needs a draft model"),
        "bf16-int8": (gen + ["--target", t, "--draft", d, "--dtype", "bfloat16", "--draft-quant", "int8"],
                      "int8 needs a float32 draft"),
        "unknown-device": (gen + ["--target", t, "--draft", d, "--device", "tpu9"], "unknown device"),
        "vocab-mismatch": (gen + ["--target", t, "--draft", str(root / "draft_other_vocab"), "--device", "cpu"],
                           "vocabularies differ"),
    }
    if not torch.cuda.is_available():
        cases["cuda-on-cpu-torch"] = (gen + ["--target", t, "--draft", d, "--device", "cuda"], "--device cuda")
    return cases


ERROR_CASES = list(_error_cases(Path("/")))


@pytest.fixture(scope="module")
def cli_errors(model_dirs):
    """Every error case run as its own ``python -m ouroboros`` process (one after another, so each gets the cores):
    case -> (completed process, seconds, expected message)."""
    cases = _error_cases(model_dirs[0])
    return {name: (*_cli(*argv), message) for name, (argv, message) in cases.items()}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors_are_one_line_and_exit_2(cli_errors, case):
    proc, seconds, message = cli_errors[case]
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) <= 2, proc.stderr
    assert lines[-1].startswith("error: ") and message in lines[-1], proc.stderr
    # Under 15 s: no network wait, no slow load before the error. Every case pays the same start-up (importing torch
    # and transformers, ~4 s on 2 idle cores); when a loaded machine alone makes that exceed 10 s, allow start-up + 5 s.
    startup = min(s for _, s, _ in cli_errors.values())
    assert seconds < max(15.0, startup + 5.0), f"{case} took {seconds:.1f}s (start-up {startup:.1f}s)"


def test_debug_raises_instead(capsys):
    argv = ["generate", "--target", "/nonexistent/dir", "--draft", "x", "--prompt", "hi"]
    assert main(argv) == 2 and capsys.readouterr().err == "error: no model directory at /nonexistent/dir\n"
    with pytest.raises(ValueError, match="no model directory at /nonexistent/dir"):
        main(argv + ["--debug"])
    with pytest.raises(ValueError, match="no model directory at /nonexistent/dir"):
        main(["--debug"] + argv)                    # before the subcommand too


# ---- the one-time conversion of the real pair: announced with its size ---------------------------------------------
def test_gguf_parameter_count_reads_the_header_across_chunks(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(300)])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("a", np.zeros((3, 4), dtype=np.float32))
    writer.add_tensor("b", np.zeros((5,), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    cuts = [0, 7, 101, len(data) // 2, len(data)]               # chunks split the header at odd places
    chunks = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        chunks.append(tmp_path / f"part{i}")
        chunks[-1].write_bytes(data[a:b])
    assert gguf_parameter_count(chunks) == 17


def test_first_run_conversion_is_announced_in_one_line(tmp_path, monkeypatch, capsys):
    spec = PAIRS[DEFAULT_PAIR]
    monkeypatch.setattr(cli_gguf, "converted_bytes", lambda m: {spec.target: 7 << 30, spec.draft: 2 << 30}[m])
    cli_gguf.announce_conversion([spec.target, spec.draft], tmp_path)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert str(tmp_path) in err and "OUROBOROS_CACHE" in err and "9.0 GiB" in err and "once" in err
    assert "Qwen2.5-Coder-1.5B-Instruct" in err and "Qwen2.5-Coder-0.5B-Instruct" in err


def test_generate_decodes_several_prompts_as_one_batch(model_dirs, capsys, tmp_path):
    """--prompt given twice (and --prompt-file): one batch, each prompt printed with its own greedy continuation."""
    root, target, tok = model_dirs
    prompts = ["w5 w6 w7 w8 w5 w6 w7 w8 w5", "w9 w10", "w11 w12 w13"]
    (tmp_path / "more.txt").write_text(prompts[2] + "\n\n")
    assert main(["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompt", prompts[0],
                 "--prompt", prompts[1], "--prompt-file", str(tmp_path / "more.txt"), "--max-new-tokens", "8",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for i, prompt in enumerate(prompts):
        ids = tok(prompt).input_ids
        expected = tok.decode(ids + hf_greedy(target, ids, 8), skip_special_tokens=True)
        assert f"=== prompt {i + 1} of 3\n{expected}\n" in out
    assert "batch of 3" in out


def test_generate_refuses_an_unreadable_prompt_file_before_loading(capsys):
    assert main(["generate", "--target", "/nonexistent", "--prompt-file", "/nonexistent/prompts.txt"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prompt-file" in err[0]


def test_generate_samples_reproducibly_with_a_seed(model_dirs, capsys):
    root, _, _ = model_dirs
    argv = ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompt",
            "w5 w6 w7 w8 w5 w6 w7", "--max-new-tokens", "10", "--device", "cpu", "--do-sample", "--temperature", "0.7",
            "--top-p", "0.95", "--top-k", "20"]
    texts = []
    for seed in ("3", "3", "4"):
        assert main(argv + ["--seed", seed]) == 0
        out = capsys.readouterr().out
        assert "[ouroboros] 10 tokens" in out
        texts.append(out.split("\n[ouroboros]")[0])
    assert texts[0] == texts[1] and texts[0] != texts[2]


@pytest.mark.parametrize("flags, match", [
    (["--temperature", "0.7", "--seed", "1"], "--temperature, --seed only apply with --do-sample"),
    (["--do-sample", "--top-p", "1.5"], "top_p"),
    (["--do-sample", "--temperature", "-1"], "temperature"),
    (["--do-sample", "--top-k", "-2"], "top_k"),
])
def test_bad_sampling_flags_are_named_before_models_load(flags, match):
    args = build_parser().parse_args(["generate", "--target", "/nonexistent", "--prompt", "x", *flags])
    with pytest.raises(ValueError, match=match):
        sampling_kwargs(args)
