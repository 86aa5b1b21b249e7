"""``ouroboros.custom_generate``: Ouroboros as the decoding loop of Hugging Face ``model.generate``.

    out = target.generate(**inputs, custom_generate=ouroboros.custom_generate, draft=draft, max_new_tokens=128)
    out = target.generate(**inputs, custom_generate=ouroboros.custom_generate, draft=draft, do_sample=True,
                          temperature=0.7, top_p=0.95, method="ouroboros", gamma=8)

``generate`` does its usual preparation (GenerationConfig resolution incl. the model's own defaults, logits processors
and warpers, stopping criteria, attention mask) and then calls :func:`custom_generate` in place of its sampling loop,
passing the extra keyword arguments of this function's signature (``draft``, ``method``, ``gamma``, ...) through.
Read off transformers 5.24 (``GenerationMixin.generate`` / ``_extract_generation_mode_kwargs``): a callable
``custom_generate`` receives neither ``streamer`` nor ``tokenizer`` (the kwargs dict is replaced by the callable's own
keys). ``generate`` has already put the prompt into the streamer and still holds it in its frame, so the streamer is
taken from there; the tokenizer is gone, so ``stop_strings`` need ``stopping_criteria=[StopStringCriteria(tokenizer,
stop_strings)]`` until transformers passes ``tokenizer`` on (then ``stop_strings=`` + ``tokenizer=`` work as well).
"""
from __future__ import annotations

import inspect
import sys
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from ouroboros.api import pad_token, stream
from ouroboros.decoding.batch import BatchStats
from ouroboros.decoding.stats import GenerationStats
from ouroboros.drafting.pool import PhrasePool

__all__ = ["custom_generate"]

# model kwargs ``generate`` prepares for every decoder-only call; anything else (inputs_embeds, pixel_values, ...)
# would change what the model computes and is refused.
_PREPARED_MODEL_KWARGS = frozenset({"attention_mask", "position_ids", "logits_to_keep", "cache", "past_key_values",
                                    "use_cache", "cache_position"})
_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__


def _is_set(value: Any, threshold: float | None = None) -> bool:
    if value is None or value is False:
        return False
    return threshold is None or value > threshold


# (GenerationConfig attribute, "set" threshold (None: any non-None, non-False value), why it is refused)
_UNSUPPORTED_CONFIG = (
    ("num_beams", 1, "beam search"),
    ("num_beam_groups", 1, "group beam search"),
    ("constraints", None, "constrained beam search"),
    ("force_words_ids", None, "constrained beam search"),
    ("num_return_sequences", 1, "one sequence per prompt is generated"),
    ("penalty_alpha", 0, "contrastive search"),
    ("dola_layers", None, "DoLa decoding"),
    ("watermarking_config", None, "the watermark processor keeps per-call state; ours run once per verified node"),
    ("prompt_lookup_num_tokens", None, "HF prompt lookup (use method='prompt_lookup')"),
    ("assistant_early_exit", None, "HF assisted generation (pass draft= instead)"),
    ("use_mtp", None, "HF multi-token prediction"),
    ("output_attentions", None, "attention weights are not kept"),
    ("output_hidden_states", None, "hidden states are not kept"),
)


def _check_options(generation_config: GenerationConfig, synced_gpus: bool, hf_locals: dict,
                   model_kwargs: dict) -> None:
    """Raise ValueError naming the first option this decoding loop cannot honour."""
    for name, threshold, why in _UNSUPPORTED_CONFIG:
        value = getattr(generation_config, name, None)
        if _is_set(value, threshold):
            raise ValueError(f"ouroboros.custom_generate does not support {name}={value!r} ({why})")
    guidance = getattr(generation_config, "guidance_scale", None)
    if guidance is not None and guidance != 1:      # HF adds its (stateful, model-calling) processor for any != 1
        raise ValueError(f"ouroboros.custom_generate does not support guidance_scale={guidance!r} (classifier-free "
                         "guidance runs its own model forwards, one token at a time)")
    if synced_gpus or hf_locals.get("synced_gpus"):
        raise ValueError("ouroboros.custom_generate does not support synced_gpus=True (single device only)")
    if hf_locals.get("assistant_model") is not None:
        raise ValueError("ouroboros.custom_generate does not take assistant_model=: pass the draft as draft=")
    for key, value in model_kwargs.items():
        if key not in _PREPARED_MODEL_KWARGS and value is not None:
            raise ValueError(f"ouroboros.custom_generate does not support the model input {key!r}")
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
        raise ValueError(f"ouroboros.custom_generate does not continue from a filled cache (cache holds "
                         f"{cache.get_seq_length()} tokens): pass the whole text as input_ids")


def _generate_frame_locals() -> dict:
    """The locals of the ``GenerationMixin.generate`` call that invoked us ({} when there is none)."""
    frame = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            break
        if frame.f_code is _GENERATE_CODE:
            return frame.f_locals
        frame = frame.f_back
    return {}


def _left_pads(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """How many leading positions ``attention_mask`` masks out; ValueError unless it is left padding (batch 1)."""
    if attention_mask is None:
        return 0
    mask = attention_mask.reshape(-1).bool()
    if mask.numel() != input_ids.shape[1]:
        raise ValueError(f"attention_mask has {mask.numel()} positions but input_ids has {input_ids.shape[1]}")
    n_pad = int((~mask).cumprod(0).sum())        # leading zeros
    if not bool(mask[n_pad:].all()):
        raise ValueError("attention_mask must be left padding (zeros, then ones); masked positions after the first "
                         "attended one are not supported")
    if n_pad == mask.numel():
        raise ValueError("attention_mask masks every position: the prompt is empty")
    return n_pad


class _AsInHF(LogitsProcessor):
    """Runs ``processors`` on what HF's own loop would give them: the padded ids (the stripped left pads put back),
    on the device of the caller's ``input_ids`` (HF moves the logits there, and its processors hold tensors there)."""

    def __init__(self, processors: LogitsProcessorList, pads: torch.Tensor, row: int = 0, rows: int = 1) -> None:
        """``pads``: the row's stripped left padding (1, n). In a batch of ``rows``, processors prepared by HF may
        hold per-row state (shape (rows,)), so they are run on ``rows`` copies of this row and row ``row`` of their
        result is kept: exactly what HF's batched loop gives that row."""
        self.processors, self.pads, self.row, self.rows = processors, pads, row, rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device = self.pads.device
        ids = torch.cat([self.pads.expand(input_ids.shape[0], -1), input_ids.to(device)], dim=-1)
        if self.rows == 1:
            return self.processors(ids, scores.to(device)).to(scores.device)
        out = self.processors(ids.expand(self.rows, -1), scores.to(device).expand(self.rows, -1).clone())
        return out[self.row:self.row + 1].to(scores.device)


def _sampling_kwargs(generation_config: GenerationConfig, processors: LogitsProcessorList,
                     pads: list[torch.Tensor], scores_out: list | None, draft_sampling: bool | None) -> dict:
    """The sampling arguments of :func:`ouroboros.stream` for this call (none for plain greedy without extras).

    ``processors`` is generate's prepared list, which already holds the temperature / top-k / top-p warpers when
    ``do_sample``, so the sampling parameters themselves stay None (nothing is applied twice). ``pads``: each row's
    stripped left padding (1, n), put back for its processors; several rows get one processor list each.
    """
    do_sample = bool(generation_config.do_sample)
    if not do_sample and not len(processors) and scores_out is None and not draft_sampling:
        return {}
    out = dict(do_sample=do_sample, logits_processor=processors if do_sample else None, scores_out=scores_out,
               draft_sampling=draft_sampling)
    if len(processors) and len(pads) > 1:
        out["logits_processor"] = None
        out["row_logits_processors"] = [LogitsProcessorList([_AsInHF(processors, p, i, len(pads))])
                                        for i, p in enumerate(pads)]
    elif len(processors):
        out["logits_processor"] = LogitsProcessorList([_AsInHF(processors, pads[0])])
    return out


class _Output:
    """The growing result of one call: HF's ``input_ids`` (pads included) plus the tokens kept so far, with their
    scores, and whether a stopping criterion has fired."""

    def __init__(self, input_ids: torch.Tensor, criteria: StoppingCriteriaList, scores_out: list | None,
                 criteria_see_scores: bool, keep_going: bool = False) -> None:
        """``keep_going``: after a criterion fires, keep appending (HF's batched loop without an EOS criterion lets a
        finished row generate on until every row is finished); ``stop_len`` is the length it fired at."""
        self.sequence, self.criteria, self.scores_out = input_ids, criteria, scores_out
        self.criteria_see_scores, self.keep_going = criteria_see_scores, keep_going
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self.stopped = False
        self.stop_len: int | None = None

    def extend(self, tokens: list[int]) -> int:
        """Append ``tokens`` one at a time, checking the criteria after each as HF's loop does (so a stop inside an
        accepted phrase cuts there, unless ``keep_going``); returns how many were kept."""
        if self.stopped:
            self.sequence = torch.cat([self.sequence, self.sequence.new_tensor([tokens])], dim=-1)
            return len(tokens)
        for kept, token in enumerate(tokens, start=1):
            step = torch.tensor([[token]], dtype=self.sequence.dtype, device=self.sequence.device)
            self.sequence = torch.cat([self.sequence, step], dim=-1)
            if self.scores_out is not None:
                processed, raw = self.scores_out[len(self.scores)]
                self.scores.append(processed)
                self.logits.append(raw)
            seen = tuple(self.scores) if self.criteria_see_scores else None     # what HF's loop passes
            if bool(self.criteria(self.sequence, seen).any()):
                self.stopped, self.stop_len = True, self.sequence.shape[1]
                if self.keep_going:
                    return kept + self.extend(tokens[kept:])
                return kept
        return len(tokens)


def custom_generate(model, input_ids: torch.LongTensor, logits_processor: LogitsProcessorList | None = None,
                    stopping_criteria: StoppingCriteriaList | None = None,
                    generation_config: GenerationConfig | None = None, synced_gpus: bool = False, streamer=None, *,
                    draft=None, method: str = "ouroboros", gamma: int | None = None, ngram: int | None = None,
                    window: int | None = None, guess_set: int | None = None, topk: int | None = None,
                    pool: PhrasePool | None = None, adaptive: bool | None = None, fast: bool | None = None,
                    draft_sampling: bool | None = None, stats: GenerationStats | None = None,
                    stop_strings: str | list[str] | None = None, tokenizer=None, **model_kwargs):
    """Decode with ouroboros inside ``model.generate(..., custom_generate=ouroboros.custom_generate)``, batches too.

    Guarantees, for the settings ``generate`` resolved:
    - greedy (``do_sample=False``): the tokens ``model.generate`` itself returns, token for token (float32);
      logits processors (min_new_tokens, repetition_penalty, bad_words_ids, user ones, ...) apply before the argmax;
    - ``do_sample=True``: tokens distributed as HF's own sampling with the same processors and warpers (lossless
      speculative sampling), drawn from torch's global RNG, so ``torch.manual_seed`` makes a call reproducible;
    - ``max_new_tokens`` / ``max_length``, ``eos_token_id`` (one or a list) and every stopping criterion are checked
      after each token as HF's loop does, so generation stops at the same token even inside an accepted phrase;
    - ``streamer`` gets the prompt (from ``generate``), then each cycle's new tokens, then ``end()``;
    - a left-padded ``attention_mask`` is honoured: the pads are stripped for decoding and kept in the result;
    - returns the (1, L + n) ids, or with ``return_dict_in_generate=True`` a ``GenerateDecoderOnlyOutput`` with
      ``sequences``, ``scores`` (``output_scores``: processed scores per new token) and ``logits``
      (``output_logits``: raw logits per new token); its ``cache`` is None (ouroboros keeps its own caches).
    A batch (B > 1, left-padded with ``attention_mask``): every row as above on its own prompt, rows right-padded
    with the pad id; no streamer, ``output_scores`` or ``output_logits`` there.
    Unsupported options (beam search, ``num_return_sequences`` > 1, ``output_attentions``, an
    ``assistant_model``, ...) raise ValueError naming the option.

    Ouroboros keywords: ``draft`` (the draft model; needed by "speculative" and "ouroboros"), ``method``, ``gamma``,
    ``ngram``, ``window``, ``guess_set``, ``topk``, ``pool``, ``adaptive``, ``fast``, ``draft_sampling`` (the draft
    samples its processed distribution; None: the device default) as in :func:`ouroboros.generate`; ``stats`` is filled with
    a :class:`GenerationStats`.
    """
    generation_config = generation_config if generation_config is not None else model.generation_config
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    hf_locals = _generate_frame_locals()
    streamer = streamer if streamer is not None else hf_locals.get("streamer")
    _check_options(generation_config, synced_gpus, hf_locals, model_kwargs)
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"ouroboros.custom_generate needs input_ids of shape (B, L), got {tuple(input_ids.shape)}")
    stopping_criteria = _with_stop_strings(stopping_criteria, stop_strings, tokenizer)
    ouro = dict(method=method, pool=pool, gamma=gamma, ngram=ngram, window=window, guess_set=guess_set, topk=topk,
                fast=fast, adaptive=adaptive, stats=stats, draft_sampling=draft_sampling)
    if input_ids.shape[0] > 1:
        return _generate_batch(model, draft, input_ids, model_kwargs.get("attention_mask"), generation_config,
                               logits_processor, stopping_criteria, streamer, ouro)

    n_pad = _left_pads(input_ids, model_kwargs.get("attention_mask"))
    prompt = input_ids[0, n_pad:]
    want_scores = bool(generation_config.return_dict_in_generate and generation_config.output_scores)
    want_logits = bool(generation_config.return_dict_in_generate and generation_config.output_logits)
    scores_out: list | None = [] if (want_scores or want_logits) else None
    sampling = _sampling_kwargs(generation_config, logits_processor, [input_ids[:, :n_pad]], scores_out,
                                ouro.pop("draft_sampling"))
    eos, budget = _limits(generation_config, input_ids.shape[1])

    out = _Output(input_ids, stopping_criteria, scores_out, want_scores)
    cycles = stream(model, draft, prompt, max_new_tokens=budget, eos_token_id=eos, **ouro, **sampling)
    try:
        for new in cycles:
            kept = out.extend(new)
            if streamer is not None and kept:
                streamer.put(torch.tensor(new[:kept], dtype=torch.long))
            if out.stopped:
                break
    finally:
        cycles.close()
    if streamer is not None:
        streamer.end()
    if not generation_config.return_dict_in_generate:
        return out.sequence
    return GenerateDecoderOnlyOutput(sequences=out.sequence, scores=tuple(out.scores) if want_scores else None,
                                     logits=tuple(out.logits) if want_logits else None, attentions=None,
                                     hidden_states=None, cache=None)


def _with_stop_strings(criteria: StoppingCriteriaList, stop_strings: str | list[str] | None,
                       tokenizer) -> StoppingCriteriaList:
    """``criteria`` plus a :class:`StopStringCriteria` for ``stop_strings`` (which need ``tokenizer``)."""
    if stop_strings is None:
        return criteria
    if tokenizer is None:
        raise ValueError("stop_strings need a tokenizer, and transformers does not pass tokenizer= on to a "
                         "custom_generate callable: pass stopping_criteria=StoppingCriteriaList("
                         "[StopStringCriteria(tokenizer, stop_strings)]) instead")
    return StoppingCriteriaList([*criteria, StopStringCriteria(tokenizer, stop_strings)])


def _limits(generation_config: GenerationConfig, input_len: int) -> tuple[list[int], int]:
    """The EOS ids and the new-token budget ``generate`` resolved (or their defaults when called without its
    preparation): max_length counts the prompt, pads included, and HF's loop emits at least one token."""
    eos = getattr(generation_config, "_eos_token_tensor", None)
    if eos is None and generation_config.eos_token_id is not None:
        eos = torch.tensor(generation_config.eos_token_id)
    max_length = generation_config.max_length
    if max_length is None:
        max_length = input_len + (generation_config.max_new_tokens or 20)
    return ([] if eos is None else eos.reshape(-1).tolist()), max(1, max_length - input_len)


def _generate_batch(model, draft, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    generation_config: GenerationConfig, logits_processor: LogitsProcessorList,
                    stopping_criteria: StoppingCriteriaList, streamer, ouro: dict) -> Any:
    """:func:`custom_generate` for B > 1: every row decoded on its own (its padding stripped, put back for its
    processors and criteria, which see exactly what HF's batched loop gives them), one batch of forwards; a row that
    a criterion stops ends there. Returns (B, L + n), rows right-padded with the pad id."""
    if streamer is not None:
        raise ValueError("ouroboros.custom_generate streams batch size 1 only; pass streamer=None for a batch")
    if ouro["stats"] is not None and not isinstance(ouro["stats"], BatchStats):
        raise ValueError("a batch fills a BatchStats (ouroboros.decoding.batch.BatchStats), not GenerationStats")
    if generation_config.return_dict_in_generate and (generation_config.output_scores
                                                      or generation_config.output_logits):
        raise ValueError("ouroboros.custom_generate returns output_scores / output_logits at batch size 1 only")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    pads = [_left_pads(input_ids[i:i + 1], mask[i:i + 1]) for i in range(input_ids.shape[0])]
    eos, budget = _limits(generation_config, input_ids.shape[1])
    row_pads = [input_ids[i:i + 1, :n] for i, n in enumerate(pads)]
    sampling = _sampling_kwargs(generation_config, logits_processor, row_pads, None, ouro.pop("draft_sampling"))
    keep_going = not eos      # HF pads a finished row only when an EOS criterion is there; else it generates on
    outs = [_Output(input_ids[i:i + 1], stopping_criteria, None, False, keep_going)
            for i in range(input_ids.shape[0])]
    stopped: set[int] = set()
    cycles = stream(model, draft, [input_ids[i, n:].tolist() for i, n in enumerate(pads)], max_new_tokens=budget,
                    eos_token_id=eos, stop_rows=stopped, **ouro, **sampling)
    final = None                                      # keep_going: the length at which the last row finished
    try:
        for row, new in cycles:
            if row in stopped:
                continue
            outs[row].extend(new)
            if final is None and all(o.stopped for o in outs):
                final = max(o.stop_len for o in outs)
            if (outs[row].stopped and not keep_going) or (final is not None and outs[row].sequence.shape[1] >= final):
                stopped.add(row)
    finally:
        cycles.close()
    if final is not None:
        for o in outs:
            o.sequence = o.sequence[:, :final]
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad = int(pad) if pad is not None else pad_token(model, eos or None)
    width = max(o.sequence.shape[1] for o in outs)
    sequences = torch.stack([torch.nn.functional.pad(o.sequence[0], (0, width - o.sequence.shape[1]), value=pad)
                             for o in outs])
    if not generation_config.return_dict_in_generate:
        return sequences
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=None, logits=None, attentions=None,
                                     hidden_states=None, cache=None)
