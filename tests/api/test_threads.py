"""Long-lived use from several threads (issue 20): our calls leave other threads' HF forwards bit-identical, one model
serves one ouroboros call at a time (a second overlapping call raises RuntimeError), different models run at once."""
from __future__ import annotations

import gc
import threading

import ouroboros
import pytest
import torch
from conftest import hf_greedy, make_model, noisy_copy

PROMPT = [5, 17, 17, 3, 42, 8, 5, 17, 17, 3, 60, 2, 9]
NEW = 12


@pytest.fixture(scope="module")
def pair():
    target = make_model("llama", seed=3)
    return target, noisy_copy(target, 0.02)


def _hf_run(model, prompt: list[int]):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                             pad_token_id=0, output_scores=True, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.scores), torch.stack(out.logits)


def _run_in_thread(fn):
    """Run ``fn`` in a new thread; return (thread, box) where box gets "value" or "error"."""
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            box["error"] = err

    thread = threading.Thread(target=body)
    thread.start()
    return thread, box


def test_hf_generate_in_another_thread_is_bit_identical(pair):
    """HF generate on the SAME model in another thread, while our CPU calls (small-M linear on that model's Linear
    modules) run in this one: HF's tokens, scores and logits equal a run alone bit for bit. (With the former
    process-wide F.linear swap this test fails: checked.)"""
    target, draft = pair
    hf_prompt = PROMPT[:2]   # 2-row prefills: at this width the small-M path changes their last bits (13 rows: not)
    alone = _hf_run(target, hf_prompt)
    owners: list[int] = []
    hook = target.lm_head.register_forward_pre_hook(lambda mod, args: owners.append(threading.get_ident()))
    hf_done = threading.Event()
    try:
        def hf_many():
            try:
                return [_hf_run(target, hf_prompt) for _ in range(12)]
            finally:
                hf_done.set()

        thread, box = _run_in_thread(hf_many)
        ours = []
        while not hf_done.is_set() or not ours:
            ours.append(ouroboros.generate(target, draft, PROMPT, max_new_tokens=NEW, method="ouroboros")[0].tolist())
        thread.join()
    finally:
        hook.remove()
    assert "error" not in box, box.get("error")
    hf_thread = thread.ident
    switches = sum(1 for a, b in zip(owners, owners[1:]) if a != b)
    assert switches >= 2 and hf_thread in owners, "the two threads' forwards never interleaved"
    for seq, scores, logits in box["value"]:
        assert torch.equal(seq, alone[0]) and torch.equal(scores, alone[1]) and torch.equal(logits, alone[2])
    want = PROMPT + hf_greedy(target, PROMPT, NEW)
    assert all(o == want for o in ours)


def test_second_call_on_a_busy_model_raises(pair):
    target, draft = pair
    first = ouroboros.stream(target, draft, PROMPT, max_new_tokens=NEW)
    next(first)                                            # the stream now holds target and draft
    thread, box = _run_in_thread(lambda: ouroboros.generate(target, draft, PROMPT, max_new_tokens=NEW))
    thread.join()
    assert isinstance(box.get("error"), RuntimeError) and "another thread" in str(box["error"])
    with pytest.raises(RuntimeError, match="unfinished ouroboros.stream of this same thread"):
        next(ouroboros.stream(target, None, PROMPT, max_new_tokens=NEW, method="greedy"))
    with pytest.raises(RuntimeError, match="already in use"):   # the draft alone is busy too
        next(ouroboros.stream(draft, None, PROMPT, max_new_tokens=NEW, method="greedy"))
    first.close()                                          # released on close ...
    thread, box = _run_in_thread(lambda: ouroboros.generate(target, draft, PROMPT, max_new_tokens=NEW))
    thread.join()
    assert box["value"][0, len(PROMPT):].tolist() == hf_greedy(target, PROMPT, NEW)


def test_leases_end_with_the_call(pair):
    target, draft = pair
    pool = ouroboros.PhrasePool(ngram=4)
    gen = ouroboros.stream(target, draft, PROMPT, max_new_tokens=NEW, pool=pool)
    next(gen)
    other = make_model("llama", seed=4)
    with pytest.raises(RuntimeError, match="PhrasePool"):        # a pool is one call's at a time as well
        next(ouroboros.stream(other, None, PROMPT, max_new_tokens=NEW, method="prompt_lookup", pool=pool))
    del gen
    gc.collect()                                                # ... on garbage collection of a started stream
    list(ouroboros.stream(target, target, PROMPT, max_new_tokens=4))   # the draft may BE the target
    with pytest.raises(ValueError):                             # a call that fails validation holds nothing
        ouroboros.generate(target, draft, [], max_new_tokens=NEW)
    with pytest.raises(RuntimeError, match="inside the consumer"):   # an error inside the call releases too
        _raise_inside_stream(target, draft)
    assert ouroboros.generate(target, draft, PROMPT, max_new_tokens=NEW)[0, len(PROMPT):].tolist() == \
        hf_greedy(target, PROMPT, NEW)


def _raise_inside_stream(target, draft):
    gen = ouroboros.stream(target, draft, PROMPT, max_new_tokens=NEW)
    next(gen)
    gen.throw(RuntimeError("raised inside the consumer"))


def test_different_models_run_concurrently(pair):
    """Two pairs in two threads, both inside their call at once (a barrier in the first cycle), both lossless."""
    pairs = [pair, (lambda t: (t, noisy_copy(t, 0.02)))(make_model("qwen2", seed=5))]
    barrier = threading.Barrier(2, timeout=120)

    def call(target, draft):
        met = []

        def on_tokens(new):
            if not met:
                met.append(barrier.wait())
        return ouroboros.generate(target, draft, PROMPT, max_new_tokens=NEW, on_tokens=on_tokens)

    runs = [_run_in_thread(lambda t=t, d=d: call(t, d)) for t, d in pairs]
    for thread, _ in runs:
        thread.join()
    for (target, _), (_, box) in zip(pairs, runs):
        assert "error" not in box, box.get("error")
        assert box["value"][0, len(PROMPT):].tolist() == hf_greedy(target, PROMPT, NEW)
