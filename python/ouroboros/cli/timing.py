"""The one timing harness of ``demo`` and ``bench``: sides (ways to decode one prompt), a warm-up, alternating timed
rounds, and the speed-up of one side over another with its spread."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ouroboros.api import generate
from ouroboros.decoding.stats import GenerationStats

__all__ = ["BUSY_SPREAD", "WARM_UP_TOKENS", "Side", "hf_greedy", "transformers_greedy_side", "ouroboros_side",
           "TimedRun", "warm_up", "time_alternately", "SpeedUp"]

BUSY_SPREAD = 1.3          # runs of one side farther apart than this (max/min): the machine looks busy
WARM_UP_TOKENS = 8         # new tokens of each side's warm-up run

# One way to decode the prompt: max_new_tokens -> (prompt + new token ids, the run's stats or None).
Side = Callable[[int], tuple[list[int], GenerationStats | None]]


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: list[int]) -> list[int]:
    """Transformers' own greedy decoding, ``model.generate(do_sample=False)``: prompt + new token ids."""
    ids = torch.tensor([prompt], device=model.device)
    pad = model.generation_config.pad_token_id
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos or None,
                             pad_token_id=pad if pad is not None else (eos[0] if eos else 0))
    return out[0].tolist()


def transformers_greedy_side(model, prompt: list[int], eos: list[int]) -> Side:
    """:func:`hf_greedy` on ``prompt`` as a side (no stats)."""
    return lambda max_new_tokens: (hf_greedy(model, prompt, max_new_tokens, eos), None)


def ouroboros_side(target, draft, prompt: list[int], method: str, params: dict,
                   eos: list[int] | None = None) -> Side:
    """``ouroboros.generate(method=method, **params)`` on ``prompt`` as a side (``eos`` None: the target's own)."""
    def run(max_new_tokens: int) -> tuple[list[int], GenerationStats]:
        ids, stats = generate(target, draft, [prompt], max_new_tokens=max_new_tokens, method=method,
                              return_stats=True, eos_token_id=eos, **params)
        return ids[0].tolist(), stats
    return run


@dataclass
class TimedRun:
    side: str
    seconds: float
    tokens: list[int]               # prompt + new tokens
    new_tokens: int
    stats: GenerationStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def warm_up(sides: dict[str, Side], max_new_tokens: int) -> None:
    """A short untimed run of every side (pages the weights in, so no timed run pays for it)."""
    for run in sides.values():
        run(min(max_new_tokens, WARM_UP_TOKENS))


def time_alternately(sides: dict[str, Side], repeat: int, max_new_tokens: int, prompt_len: int,
                     on_run: Callable[[int, list[TimedRun]], None] | None = None) -> list[list[TimedRun]]:
    """Run every side once per round, ``repeat`` rounds, timing each call end to end with ``time.perf_counter``.

    Sides alternate inside a round, so a slow spell of the machine hits both. Returns the rounds, each a list of one
    :class:`TimedRun` per side in ``sides`` order; ``on_run(round_index, runs)`` is called after each round."""
    rounds = []
    for i in range(repeat):
        runs = []
        for name, run in sides.items():
            start = time.perf_counter()
            tokens, stats = run(max_new_tokens)
            runs.append(TimedRun(name, time.perf_counter() - start, tokens, len(tokens) - prompt_len, stats))
        rounds.append(runs)
        if on_run is not None:
            on_run(i, runs)
    return rounds


@dataclass(frozen=True)
class SpeedUp:
    """The speed-up of the second side over the first, from alternating rounds."""

    median: float
    low: float
    high: float
    rounds: int
    spread: float                   # the largest max/min ratio of one side's times, or of the per-round speed-ups

    @classmethod
    def from_rounds(cls, rounds: list[list[TimedRun]]) -> SpeedUp:
        ratios = [base.seconds / max(ours.seconds, 1e-9) for base, ours in rounds]
        sides = [[r.seconds for r in side] for side in zip(*rounds)] + [ratios]
        spread = max(max(v) / max(min(v), 1e-9) for v in sides)
        return cls(statistics.median(ratios), min(ratios), max(ratios), len(rounds), spread)

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD

    def __str__(self) -> str:
        return f"{self.median:.2f}x ({self.low:.2f}-{self.high:.2f}x over {self.rounds} runs each)"
