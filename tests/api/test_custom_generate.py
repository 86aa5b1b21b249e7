"""``model.generate(..., custom_generate=ouroboros.custom_generate)`` against HF's own ``generate``, same settings."""
from __future__ import annotations

import ouroboros
import pytest
import torch
from conftest import chi2_pvalue, make_model, make_tokenizer, noisy_copy
from ouroboros.decoding.batch import BatchStats
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    StopStringCriteria,
    TextStreamer,
)

REPETITIVE = [5, 6, 7, 8, 5, 6, 7, 8, 5]        # pool phrases and long accepted runs
PROMPTS = [REPETITIVE, [3], list(range(10, 40))]


@pytest.fixture(scope="module")
def pair():
    target = make_model("llama")
    return target, noisy_copy(target, 0.02)


def hf(target, ids: torch.Tensor, mask: torch.Tensor | None = None, **kw):
    """HF's own ``generate`` (explicit attention mask: otherwise prompt tokens equal to pad would be masked)."""
    return target.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, **kw)


def ours(target, draft, ids: torch.Tensor, mask: torch.Tensor | None = None, method: str = "ouroboros", **kw):
    return hf(target, ids, mask, custom_generate=ouroboros.custom_generate, draft=draft, method=method, **kw)


@pytest.mark.parametrize("method", ouroboros.METHODS)
def test_greedy_equals_hf_generate(pair, method):
    target, draft = pair
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        ref = hf(target, ids, max_new_tokens=20)
        assert torch.equal(ours(target, draft, ids, method=method, max_new_tokens=20), ref), prompt
        new = ref[0, len(prompt):].tolist()
        eos = [new[9], new[5], 95]                           # a list: the first of them to appear ends the text
        ref_eos = hf(target, ids, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
        assert ref_eos.shape[1] < ref.shape[1]
        assert torch.equal(ours(target, draft, ids, method=method, max_new_tokens=20, eos_token_id=eos,
                                pad_token_id=0), ref_eos), prompt
        n = len(prompt) + 7                                   # max_length instead of max_new_tokens
        assert torch.equal(ours(target, draft, ids, method=method, max_length=n), hf(target, ids, max_length=n))


class _Ban(LogitsProcessor):
    """A user processor: bans ``token`` once the sequence is longer than ``after``."""

    def __init__(self, token: int, after: int) -> None:
        self.token, self.after = token, after

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] > self.after:
            scores = scores.clone()
            scores[:, self.token] = -float("inf")
        return scores


@pytest.mark.parametrize("method", ["speculative", "ouroboros"])
def test_processors_scores_and_left_padding_match_hf(pair, method):
    """HF's resolved processors (repetition penalty, no-repeat n-grams, min_new_tokens, a user processor) apply
    before the argmax; return_dict_in_generate gives HF's sequences, scores and logits; left pads are kept."""
    target, draft = pair
    ids = torch.tensor([REPETITIVE])
    plain = hf(target, ids, max_new_tokens=16)[0, len(REPETITIVE):].tolist()
    kw = dict(max_new_tokens=16, repetition_penalty=1.4, no_repeat_ngram_size=3, min_new_tokens=6,
              eos_token_id=plain[2], pad_token_id=0, logits_processor=LogitsProcessorList([_Ban(plain[4], 12)]),
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    for pads in (0, 3):
        padded = torch.tensor([[0] * pads + REPETITIVE])
        mask = torch.tensor([[0] * pads + [1] * len(REPETITIVE)])
        ref = hf(target, padded, mask, **kw)
        out = ours(target, draft, padded, mask, method=method, **kw)
        assert torch.equal(out.sequences, ref.sequences), pads
        assert out.sequences.shape[1] > padded.shape[1] + 6           # min_new_tokens held the EOS back
        assert len(out.scores) == len(ref.scores) == len(out.logits) == out.sequences.shape[1] - padded.shape[1]
        for mine, theirs in zip(out.scores + out.logits, ref.scores + ref.logits):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype
            torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    scoreless = ours(target, draft, ids, method=method, max_new_tokens=5, return_dict_in_generate=True)
    assert scoreless.scores is None and scoreless.logits is None and scoreless.sequences.shape[1] == ids.shape[1] + 5


def test_stop_strings_cut_inside_an_accepted_phrase(pair):
    target, draft = pair
    tok = make_tokenizer()
    ids = torch.tensor([REPETITIVE])
    new = hf(target, ids, max_new_tokens=24)[0, len(REPETITIVE):].tolist()
    stats = ouroboros.GenerationStats()
    ours(target, draft, ids, max_new_tokens=24, stats=stats)
    assert max(c["accepted"] for c in stats.trace) > 2                    # phrases: several tokens per cycle
    for stop in (tok.decode(new[6:8]), tok.decode(new[13:14]), "!!!!!!!!"):
        ref = hf(target, ids, max_new_tokens=24, stop_strings=[stop], tokenizer=tok)
        criteria = StoppingCriteriaList([StopStringCriteria(tok, [stop])])
        out = ours(target, draft, ids, max_new_tokens=24, stopping_criteria=criteria)
        assert torch.equal(out, ref), stop
    with pytest.raises(ValueError, match="stop_strings need a tokenizer.*StopStringCriteria"):
        ours(target, draft, ids, max_new_tokens=4, stop_strings=["x"], tokenizer=tok)


class _Collect:
    """A streamer that records every ``put`` and ``end``."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended += 1


class _TextCapture(TextStreamer):
    def __init__(self, tokenizer) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.text = ""

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.text += text


def test_streamer_gets_the_prompt_then_cycles_then_end(pair):
    target, draft = pair
    tok = make_tokenizer()
    ids = torch.tensor([REPETITIVE])
    ref, mine = _Collect(), _Collect()
    out_ref = hf(target, ids, max_new_tokens=20, streamer=ref)
    out = ours(target, draft, ids, max_new_tokens=20, streamer=mine)
    assert torch.equal(out, out_ref)
    assert mine.puts[0] == ref.puts[0] == REPETITIVE and mine.ended == ref.ended == 1
    assert sum(mine.puts[1:], []) == sum(ref.puts[1:], []) == out[0, len(REPETITIVE):].tolist()
    assert len(mine.puts) < len(ref.puts)                  # fed cycle by cycle: several tokens per put
    text_ref, text = _TextCapture(tok), _TextCapture(tok)
    hf(target, ids, max_new_tokens=20, streamer=text_ref)
    ours(target, draft, ids, max_new_tokens=20, streamer=text)
    assert text.text == text_ref.text and len(text.text) > 0


def test_pool_and_stats_keywords_pass_through(pair):
    target, draft = pair
    pool = ouroboros.PhrasePool(ngram=4, guess_set=3)
    stats = ouroboros.GenerationStats()
    ids = torch.tensor([REPETITIVE])
    out = ours(target, draft, ids, max_new_tokens=12, pool=pool, stats=stats, gamma=5, ngram=4)
    assert torch.equal(out, hf(target, ids, max_new_tokens=12))
    assert len(pool) > 0 and stats.tokens == 12 and stats.method == "ouroboros" and stats.config["gamma"] == 5


@pytest.mark.parametrize("kw, match", [
    (dict(num_beams=2), "num_beams"),
    (dict(do_sample=True, num_return_sequences=2), "num_return_sequences"),
    (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
    (dict(assistant_model="draft"), "assistant_model"),
    (dict(synced_gpus=True), "synced_gpus"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(watermarking_config="synthid"), "watermarking_config"),
    (dict(batch=2, output_scores=True, return_dict_in_generate=True), "batch size 1"),
    (dict(mask=[1, 1, 0, 1]), "left padding"),
    (dict(method="nope"), "unknown method"),
    (dict(method="speculative", draft=None), "needs a draft"),
])
def test_unsupported_options_raise_naming_them(pair, kw, match):
    target, draft = pair
    ids = torch.tensor([[5, 6, 7, 8]] * kw.pop("batch", 1))
    mask = torch.tensor([kw.pop("mask")]) if "mask" in kw else torch.ones_like(ids)
    if kw.get("assistant_model") == "draft":
        kw["assistant_model"] = draft
    if kw.get("watermarking_config") == "synthid":
        from transformers import SynthIDTextWatermarkingConfig
        kw["watermarking_config"] = SynthIDTextWatermarkingConfig(ngram_len=2, keys=[1, 2])
    kw.setdefault("draft", draft)
    with pytest.raises(ValueError, match=match):
        target.generate(ids, attention_mask=mask, max_new_tokens=4, custom_generate=ouroboros.custom_generate, **kw)


# tiny random models have flat logits: a low temperature makes the first token a real choice (max prob ~0.4)
SAMPLING = dict(do_sample=True, temperature=0.1, top_k=6)


def test_sampling_is_reproducible_with_a_seed(pair):
    target, draft = pair
    ids = torch.tensor([REPETITIVE])
    runs = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        runs.append(ours(target, draft, ids, max_new_tokens=16, **SAMPLING))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("method, extra", [("ouroboros", {}), ("speculative", {"draft_sampling": True})])
def test_first_token_distribution_is_hfs(pair, method, extra):
    """The first sampled token follows softmax(HF's processed scores) (chi-square at a fixed seed)."""
    target, draft = pair
    ids = torch.tensor([REPETITIVE])
    ref = hf(target, ids, max_new_tokens=1, return_dict_in_generate=True, output_scores=True, **SAMPLING)
    probs = torch.softmax(ref.scores[0][0], dim=-1)
    assert 0.2 < probs.max() < 0.8                        # a real choice: candidates are accepted and rejected
    counts = torch.zeros_like(probs, dtype=torch.long)
    torch.manual_seed(0)
    for _ in range(300):
        out = ours(target, draft, ids, method=method, max_new_tokens=1, **SAMPLING, **extra)
        counts[out[0, -1]] += 1
    assert chi2_pvalue(counts, probs) > 1e-3


# ---- batches ----------------------------------------------------------------------------------------------------
def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    return ids, torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])


@pytest.mark.parametrize("method", ["greedy", "speculative", "ouroboros"])
def test_a_batch_of_three_equals_the_rows_alone(pair, method):
    """B = 3, left-padded: each row equals that prompt's batch-1 HF generate (its tokens; then the pad id), with an
    EOS that stops one row early and a stop string criterion-free max_new_tokens for the others."""
    target, draft = pair
    ids, mask = left_padded(PROMPTS)
    width = ids.shape[1]
    alone = [hf(target, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist() for p in PROMPTS]
    eos = alone[0][4]
    want = [hf(target, torch.tensor([p]), max_new_tokens=12, eos_token_id=eos, pad_token_id=0)[0, len(p):].tolist()
            for p in PROMPTS]
    stats = BatchStats()
    out = ours(target, draft, ids, mask, method=method, max_new_tokens=12, eos_token_id=eos, pad_token_id=0,
               stats=stats)
    assert out.shape == (3, width + max(len(w) for w in want))
    assert torch.equal(out[:, :width], ids)
    for i, w in enumerate(want):
        assert out[i, width:].tolist() == w + [0] * (out.shape[1] - width - len(w))
    assert len(stats.rows) == 3 and stats.rows[0].tokens == len(want[0])


def test_a_batch_honours_processors_and_stopping_criteria_per_row(pair):
    """Processors see each row's padded ids as in HF's batched loop (repetition penalty counts the pads, the ban
    the padded length), and a criterion that fires in one row ends only that row."""
    target, draft = pair
    ids, mask = left_padded(PROMPTS)
    kw = dict(max_new_tokens=10, repetition_penalty=1.3, pad_token_id=0,
              logits_processor=LogitsProcessorList([_Ban(token=9, after=ids.shape[1] + 2)]))
    ref = hf(target, ids, mask, **kw)
    out = ours(target, draft, ids, mask, **kw)
    for i in range(3):                  # HF's batched rows equal ours wherever HF's float rounding agrees
        assert out[i].tolist() == ref[i].tolist(), i

    stop_tok = ref[1, ids.shape[1] + 2].item()
    criteria = StoppingCriteriaList([_TokenStop(stop_tok)])
    ref_stop = hf(target, ids, mask, max_new_tokens=10, stopping_criteria=criteria, pad_token_id=0)
    out_stop = ours(target, draft, ids, mask, max_new_tokens=10, stopping_criteria=criteria, pad_token_id=0)
    assert torch.equal(out_stop, ref_stop)


class _TokenStop(StoppingCriteria):
    """A stopping criterion: a row is done once its last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def test_a_batch_refuses_a_streamer_hf_allows_at_batch_1_only(pair):
    target, draft = pair
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(ValueError, match="batch size 1"):
        ours(target, draft, ids, mask, max_new_tokens=4, streamer=TextStreamer(make_tokenizer()))
