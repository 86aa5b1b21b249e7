"""The "codeedit" workload: HumanEval's functions handed back with a small edit, so the answer mostly copies the prompt.

Each prompt gives one complete function (HumanEval's ``prompt`` + ``canonical_solution``) and asks for it back with one
small, deterministic change; the change rotates through :data:`EDITS` by problem index, so a problem's prompt never
depends on ``n`` or ``offset``.
"""
from __future__ import annotations

__all__ = ["EDITS", "edit_instruction", "edit_prompt", "function_source"]

EDITS: tuple[str, ...] = (
    "Add type hints to every parameter and the return value.",
    "Rename the variables to longer descriptive names.",
    "Add a one-line comment above each statement block.",
    "Rewrite the docstring in Google style, keep the code unchanged.",
)


def edit_instruction(index: int) -> str:
    """The edit asked of problem ``index`` (>= 0): ``EDITS[index % len(EDITS)]``, the same on every call."""
    if index < 0:
        raise ValueError(f"problem index must be >= 0, got {index}")
    return EDITS[index % len(EDITS)]


def function_source(record: dict) -> str:
    """The complete function of a HumanEval record: its ``prompt`` (imports, signature, docstring) followed by its
    ``canonical_solution`` (the body), ending in exactly one newline."""
    return (record["prompt"] + record["canonical_solution"]).rstrip("\n") + "\n"


def edit_prompt(index: int, record: dict) -> str:
    """The user turn for problem ``index``: the full :func:`function_source` of ``record`` verbatim in a ```python
    block, then :func:`edit_instruction` and the demand to answer with the whole function in one ```python block."""
    return ("Here is a Python function:\n\n"
            f"```python\n{function_source(record)}```\n\n"
            f"{edit_instruction(index)} Change nothing else. "
            "Return the whole function in a ```python block and nothing else.")
