"""The vLLM proposer's vLLM-free logic (runs in the main environment, no vllm import): settings and their errors,
content-keyed request state, pool harvesting and chain selection, and both modes driven by a simulated engine that
verifies the chains greedily with a tiny target, repacking the rows between steps as vLLM does."""
from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import VOCAB, loop_greedy, make_model, make_tokenizer

from ouroboros.drafting.pool import PhrasePool
from ouroboros.vllm import OuroborosProposer, ProposerSettings
from ouroboros.vllm.chains import MergedPool, context_key, harvest, pool_chain, scored_chain
from ouroboros.vllm.confidence import MAX_THRESHOLD, AcceptanceModel, Proposal, step_threshold
from ouroboros.vllm.draft_mode import BatchDraft
from ouroboros.vllm.requests import RequestTable

MAX_LEN = 256


def vllm_config(k: int = 4, vocab: int = VOCAB, max_len: int = MAX_LEN) -> SimpleNamespace:
    """The attributes of vLLM's VllmConfig the proposer reads."""
    return SimpleNamespace(speculative_config=SimpleNamespace(num_speculative_tokens=k),
                           model_config=SimpleNamespace(max_model_len=max_len, get_vocab_size=lambda: vocab))


# ---- settings -------------------------------------------------------------------------------------------------
def test_settings_default_to_pool_mode_and_draft_mode_follows_a_draft_path(tmp_path):
    assert ProposerSettings.from_env({}).mode == "pool"
    (tmp_path / "config.json").write_text("{}")
    s = ProposerSettings.from_env({"OUROBOROS_VLLM_DRAFT": str(tmp_path), "OUROBOROS_VLLM_NGRAM": "5"})
    assert (s.mode, s.draft, s.ngram) == ("draft", tmp_path, 5)


@pytest.mark.parametrize("env, names", [
    ({"OUROBOROS_VLLM_MODE": "tree"}, "OUROBOROS_VLLM_MODE"),
    ({"OUROBOROS_VLLM_MODE": "draft"}, "OUROBOROS_VLLM_DRAFT"),
    ({"OUROBOROS_VLLM_DRAFT": "/nonexistent/draft"}, "OUROBOROS_VLLM_DRAFT"),
    ({"OUROBOROS_VLLM_NGRAM": "1"}, "OUROBOROS_VLLM_NGRAM"),
    ({"OUROBOROS_VLLM_GUESS_SET": "three"}, "OUROBOROS_VLLM_GUESS_SET"),
    ({"OUROBOROS_VLLM_POOL_SAVE_SECONDS": "-1"}, "OUROBOROS_VLLM_POOL_SAVE_SECONDS"),
    ({"OUROBOROS_VLLM_DRAFT_QUANT": "int4"}, "OUROBOROS_VLLM_DRAFT_QUANT"),
    ({"OUROBOROS_VLLM_DRAFT_VOCAB": "-1"}, "OUROBOROS_VLLM_DRAFT_VOCAB"),
    ({"OUROBOROS_VLLM_DRAFT_VOCAB": "32k"}, "OUROBOROS_VLLM_DRAFT_VOCAB"),
    ({"OUROBOROS_VLLM_NGRAMS": "4"}, "OUROBOROS_VLLM_NGRAMS"),
    ({"OUROBOROS_VLLM_POOL": "/nonexistent/dir/pool.pt"}, "OUROBOROS_VLLM_POOL"),
    ({"OUROBOROS_VLLM_POOL_CONFIDENCE": "high"}, "OUROBOROS_VLLM_POOL_CONFIDENCE"),
    ({"OUROBOROS_VLLM_POOL_CONFIDENCE": "-0.1"}, "OUROBOROS_VLLM_POOL_CONFIDENCE"),
    ({"OUROBOROS_VLLM_POOL_CONFIDENCE": "1.5"}, "OUROBOROS_VLLM_POOL_CONFIDENCE"),
    ({"OUROBOROS_VLLM_POOL_CONFIDENCE": "nan"}, "OUROBOROS_VLLM_POOL_CONFIDENCE"),
])
def test_a_bad_setting_raises_naming_the_variable(env, names):
    with pytest.raises(ValueError, match=names):
        ProposerSettings.from_env(env)


def test_an_unreadable_pool_file_fails_when_the_proposer_is_built(tmp_path):
    bad = tmp_path / "pool.pt"
    bad.write_text("not a pool")
    with pytest.raises(ValueError, match="OUROBOROS_VLLM_POOL"):
        OuroborosProposer(vllm_config(), env={"OUROBOROS_VLLM_POOL": str(bad)})
    PhrasePool(ngram=3).save(bad)
    with pytest.raises(ValueError, match="OUROBOROS_VLLM_NGRAM"):
        OuroborosProposer(vllm_config(), env={"OUROBOROS_VLLM_POOL": str(bad)})


def test_a_draft_of_another_vocabulary_fails_when_the_proposer_is_built(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="OUROBOROS_VLLM_DRAFT.*vocabulary"):
        OuroborosProposer(vllm_config(vocab=VOCAB + 4), env={"OUROBOROS_VLLM_DRAFT": str(tmp_path)})


# ---- request state --------------------------------------------------------------------------------------------
def test_request_state_follows_content_through_repacking_and_is_freed():
    freed = []
    table = RequestTable(new=lambda row: int(row[0]), free=freed.append)
    a, b = np.array([5, 6, 7]), np.array([9, 9])
    s1 = table.step([a, b])
    s2 = table.step([np.append(b, 3), np.append(a, 8)])           # rows swapped, each grew
    assert [s.data for s in s2] == [9, 5] and s2[0] is s1[1] and s2[1] is s1[0]
    s3 = table.step([np.array([5, 6, 0, 1])])                     # diverges from a: a new request; a, b freed
    assert s3[0].data == 5 and s3[0] is not s1[0] and sorted(freed) == [5, 9] and len(table) == 1


def test_two_requests_with_the_same_prompt_get_two_states():
    table = RequestTable(new=lambda row: object())
    s = table.step([np.array([1, 2]), np.array([1, 2])])
    assert s[0] is not s[1] and table.created == 2
    s = table.step([np.array([1, 2, 3]), np.array([1, 2, 4])])
    assert table.created == 2 and len(table) == 2


# ---- pools and chains -----------------------------------------------------------------------------------------
def test_context_keys_are_token_ids_for_one_token_and_distinct_negative_hashes_otherwise():
    assert context_key([17]) == 17
    keys = {context_key(c) for c in ([1, 2], [2, 1], [1, 2, 3], [0, 1, 2], [2, 3])}
    assert len(keys) == 5 and all(k < 0 for k in keys)


def test_harvest_is_incremental_and_equals_one_pass():
    tokens = [random.Random(0).randrange(20) for _ in range(60)]
    whole, parts = PhrasePool(ngram=4), PhrasePool(ngram=4)
    harvest(whole, tokens, 0, 3)
    nxt = 0
    for end in range(1, 61, 7):
        nxt = harvest(parts, tokens[:end], nxt, 3)
    harvest(parts, tokens, nxt, 3)
    assert whole.state_dict()["keys"].tolist() == parts.state_dict()["keys"].tolist()
    assert len(whole) == len(parts)


def test_pool_chain_prefers_the_longest_known_context_and_stops_at_k():
    own, shared = PhrasePool(ngram=3), PhrasePool(ngram=3)
    harvest(own, [1, 2, 3, 4, 9, 2, 3, 5, 6], 0, 3)               # after (2, 3): 4 then 5; after (9, 2, 3): 5
    pools = MergedPool(own, shared)
    assert pool_chain(pools, [9, 2, 3], 2, 3, 1) == [5, 6]
    assert pool_chain(pools, [7, 2, 3], 2, 3, 1) == [5, 6]        # (2, 3) newest: 5 6
    assert pool_chain(pools, [1, 2, 3], 2, 3, 1) == [4, 9]        # (1, 2, 3) known
    assert pool_chain(pools, [8, 8], 4, 3, 1) == []
    harvest(shared, [8, 8, 7, 7], 0, 3)
    assert pool_chain(pools, [8, 8], 1, 3, 1) == [7]


# ---- pool mode's confidence cut -------------------------------------------------------------------------------
def test_estimates_rise_with_accepted_tokens_fall_with_rejected_ones_and_stay_bounded():
    model = AcceptanceModel(window=16)
    low, high = model.estimate((1, 0)), model.estimate((3, 0))
    assert 0 < low < high < 1                                     # the prior: a one-token context is a weak guess
    for _ in range(5):
        model.update((1, 0), True)
    assert model.estimate((1, 0)) > low and model.estimate((3, 0)) == high      # cells learn apart
    up = model.estimate((1, 0))
    for _ in range(200):
        model.update((1, 0), False)
        model.tick()
    down = model.estimate((1, 0))
    assert down < min(up, low) and model.counts[(1, 0)][1] < 16   # decayed every step: bounded weight
    for _ in range(200):                                          # no longer observed: back towards the prior
        model.tick()
    assert down < model.estimate((1, 0)) <= low


def test_the_next_history_shows_which_tokens_were_accepted():
    model = AcceptanceModel()
    cells = [(2, 0), (2, 1), (2, 2), (3, 0)]
    last = Proposal([7, 8, 9, 10], cells, at=3)
    assert last.accepted([1, 2, 3]) is None                       # not verified yet
    history = [1, 2, 3, 7, 8, 5]                                  # 7 8 accepted, 9 rejected (5 the bonus)
    assert last.accepted(history) == 2
    estimates = [model.estimate(c) for c in cells]
    model.observe(last, history)
    after = [model.estimate(c) for c in cells]
    assert after[0] > estimates[0] and after[1] > estimates[1] and after[2] < estimates[2]
    assert after[3] == estimates[3]                               # after the first rejection: never judged
    model.observe(Proposal([7, 8], cells[:2], at=3), [1, 2, 3, 7, 8, 4])     # all accepted, then the bonus
    assert model.estimate(cells[1]) > after[1]


def test_the_chain_is_cut_where_its_estimated_acceptance_falls_below_the_threshold():
    own = PhrasePool(ngram=3)
    harvest(own, [1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 8], 0, 3)
    pools = MergedPool(own, PhrasePool(ngram=3))
    whole = pool_chain(pools, [9, 2, 3], 4, 3, 1)
    chain, cells = scored_chain(pools, [9, 2, 3], 4, 3, 1)
    assert chain == whole and len(cells) == len(chain) == 4 and cells[0] == (3, 0) and cells[1] == (3, 1)
    model = AcceptanceModel()
    products = np.cumprod([model.estimate(c) for c in cells])
    threshold = (products[1] + products[2]) / 2                   # between the 2nd and the 3rd token's product
    assert scored_chain(pools, [9, 2, 3], 4, 3, 1, model, threshold) == (whole[:2], cells[:2])
    assert scored_chain(pools, [9, 2, 3], 4, 3, 1, model, 0.0)[0] == whole      # 0: the whole chain
    assert scored_chain(pools, [9, 2, 3], 4, 3, 1, model, 0.999)[0] == []


def test_the_threshold_is_lower_at_batch_one_than_with_several_requests():
    assert step_threshold(0.15, 1) < step_threshold(0.15, 2) < step_threshold(0.15, 4) <= MAX_THRESHOLD
    assert step_threshold(0.15, 1) == 0.0 and step_threshold(0.15, 4) == pytest.approx(0.45)
    assert step_threshold(0.5, 64) == MAX_THRESHOLD and step_threshold(0.0, 64) == 0.0
    assert ProposerSettings.from_env({"OUROBOROS_VLLM_POOL_CONFIDENCE": "0"}).pool_confidence == 0.0


# ---- both modes against a simulated engine --------------------------------------------------------------------
def _greedy_next(model, tokens: list[int]) -> list[int]:
    """The target's greedy token after every prefix tokens[:i+1] (one forward)."""
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].argmax(-1).tolist()


def simulate(proposer, target, prompts: list[list[int]], new_tokens: int, seed: int = 0) -> tuple[list, int, int]:
    """Run ``prompts`` to ``new_tokens`` each as vLLM would: per step every running row proposes, the target
    verifies the chain greedily (accepted tokens + bonus), rows are shuffled between steps. Returns the outputs,
    the tokens proposed and the tokens accepted."""
    rng = random.Random(seed)
    hist = [list(p) + [_greedy_next(target, list(p))[-1]] for p in prompts]
    running, proposed, accepted = list(range(len(prompts))), 0, 0
    while running:
        rng.shuffle(running)
        ids = np.zeros((len(running), MAX_LEN), dtype=np.int32)
        for r, i in enumerate(running):
            ids[r, :len(hist[i])] = hist[i]
        chains = proposer.propose([[1]] * len(running), np.array([len(hist[i]) for i in running]), ids)
        for i, chain in zip(running, chains):
            assert len(chain) <= proposer.k
            greedy = _greedy_next(target, hist[i] + chain)[len(hist[i]) - 1:]
            n = next((j for j, t in enumerate(chain) if t != greedy[j]), len(chain))
            hist[i] += chain[:n] + [greedy[n]]
            proposed, accepted = proposed + len(chain), accepted + n
        running = [i for i in running if len(hist[i]) - len(prompts[i]) < new_tokens]
    return [h[len(p):len(p) + new_tokens] for h, p in zip(hist, prompts)], proposed, accepted


def _prompts() -> list[list[int]]:
    tok = make_tokenizer()
    texts = ["abcabcabcabcabc", "the cat the cat the", "xyz", "hello hello"]
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def test_pool_mode_is_accepted_keeps_one_state_per_request_and_frees_them():
    target = make_model("llama")
    proposer = OuroborosProposer(vllm_config(), env={})
    out, proposed, accepted = simulate(proposer, target, _prompts(), 24)
    assert out == [loop_greedy(target, p, 24) for p in _prompts()]          # the simulated engine is lossless
    assert proposed > 0 and accepted > 0
    assert proposer.table.created == len(_prompts())
    proposer.propose([], np.zeros(0), np.zeros((0, MAX_LEN), dtype=np.int32))
    assert len(proposer.table) == 0 and proposer.table.freed == len(_prompts())


def test_draft_mode_with_the_target_as_draft_is_nearly_always_accepted(tmp_path):
    target = make_model("llama")
    target.save_pretrained(tmp_path)
    proposer = OuroborosProposer(vllm_config(k=4), env={"OUROBOROS_VLLM_DRAFT": str(tmp_path),
                                                        "OUROBOROS_VLLM_DRAFT_QUANT": "none"})
    out, proposed, accepted = simulate(proposer, target, _prompts(), 24)
    assert out == [loop_greedy(target, p, 24) for p in _prompts()]
    assert proposed > 0 and accepted >= 0.95 * proposed
    assert proposer.table.created == len(_prompts())


def _pools() -> MergedPool:
    return MergedPool(PhrasePool(ngram=4, guess_set=3), PhrasePool(ngram=4, guess_set=3))


def test_draft_mode_drafts_every_request_in_one_batch_as_it_would_alone():
    draft = make_model("llama", seed=3)
    histories = [p + [5] for p in _prompts()]
    shared = BatchDraft(draft, guess_set=3)
    requests = [shared.new_request(_pools(), 4) for _ in histories]
    singles = [BatchDraft(draft, guess_set=3) for _ in histories]
    single_requests = [s.new_request(_pools(), 4) for s in singles]
    for step in range(3):                                   # later steps: rolled back, cache reused
        together = shared.propose([(r, h, 4) for r, h in zip(requests, histories)])
        alone = [s.propose([(r, h, 4)])[0] for s, r, h in zip(singles, single_requests, histories)]
        assert together == alone and all(1 <= len(c) <= 4 for c in together)
        histories = [h + c[:step] + [7] for h, c in zip(histories, together)]
    assert shared.prefill_forwards == len(histories)        # each request prefilled once, alone
    assert shared.forwards < sum(s.forwards for s in singles) / 2   # the requests' rounds share their forwards
    for r in requests:
        shared.free(r)
    assert shared.batch.rows == []


def test_draft_mode_with_a_weaker_draft_stays_exact_and_frees_its_rows(tmp_path):
    target = make_model("llama")
    make_model("llama", seed=5).save_pretrained(tmp_path)
    proposer = OuroborosProposer(vllm_config(k=4), env={"OUROBOROS_VLLM_DRAFT": str(tmp_path),
                                                        "OUROBOROS_VLLM_DRAFT_QUANT": "none"})
    out, proposed, _ = simulate(proposer, target, _prompts(), 24, seed=1)
    assert out == [loop_greedy(target, p, 24) for p in _prompts()]
    assert proposed > 0 and len(proposer.draft.batch.rows) <= len(_prompts())
    proposer.propose([], np.zeros(0), np.zeros((0, MAX_LEN), dtype=np.int32))
    assert proposer.draft.batch.rows == [] and proposer.table.freed == len(_prompts())


def test_the_pool_file_is_written_as_requests_finish_and_warms_the_next_server(tmp_path):
    target, path = make_model("llama"), tmp_path / "pool.pt"
    env = {"OUROBOROS_VLLM_POOL": str(path), "OUROBOROS_VLLM_POOL_SAVE_SECONDS": "0"}
    cold = OuroborosProposer(vllm_config(), env=env)
    _, _, acc_cold = simulate(cold, target, _prompts(), 24)
    cold.propose([], np.zeros(0), np.zeros((0, MAX_LEN), dtype=np.int32))
    assert path.is_file() and len(PhrasePool.load(path)) == len(cold.shared)
    warm = OuroborosProposer(vllm_config(), env=env)
    assert len(warm.shared) == len(cold.shared)
    _, _, acc_warm = simulate(warm, target, _prompts(), 24)
    assert acc_warm >= acc_cold


def test_draft_mode_with_a_history_head_proposes_only_its_tokens_and_stays_exact(tmp_path):
    target = make_model("llama")
    target.save_pretrained(tmp_path)
    keep = VOCAB // 2
    proposer = OuroborosProposer(vllm_config(k=4), env={"OUROBOROS_VLLM_DRAFT": str(tmp_path),
                                                        "OUROBOROS_VLLM_DRAFT_QUANT": "none",
                                                        "OUROBOROS_VLLM_DRAFT_VOCAB": str(keep)})
    head = proposer.draft.head
    assert head.base_ids == list(range(keep))
    seen: list[int] = []
    histories: set[int] = set()
    propose = proposer.propose

    def recording(sampled, n, tokens, *rest):
        chains = propose(sampled, n, tokens, *rest)
        for i, chain in enumerate(chains):
            histories.update(int(t) for t in tokens[i, :int(n[i])])
            seen.extend(chain)
        return chains

    proposer.propose = recording
    out, proposed, accepted = simulate(proposer, target, _prompts(), 24)
    assert out == [loop_greedy(target, p, 24) for p in _prompts()]
    assert proposed > 0 and accepted > 0
    # a proposal is a base token or one the running requests had seen (a pooled token only where the argmax agrees)
    assert seen and all(t < keep or t in histories for t in seen)
    assert head.rebuilds > 0 and set(head.extra_ids) <= histories


def test_pool_mode_learns_from_its_steps_and_a_high_confidence_proposes_less():
    target = make_model("llama")
    counts = {}
    for confidence in ("0", "0.15"):
        proposer = OuroborosProposer(vllm_config(), env={"OUROBOROS_VLLM_POOL_CONFIDENCE": confidence})
        out, proposed, accepted = simulate(proposer, target, _prompts(), 24)
        assert out == [loop_greedy(target, p, 24) for p in _prompts()]
        assert proposer.acceptance.counts                         # it learnt from the next steps' histories
        counts[confidence] = proposed
    assert counts["0.15"] < counts["0"]
