"""The draft's history head (``OUROBOROS_VLLM_DRAFT_VOCAB``): its outputs score the ids it names as the full head
does, float and int8, it grows to the running requests' tokens and stays bounded by them, and forwards installed on
its parts survive a rebuild; the pooled phrases per row shrink as more requests draft together (runs in the main
environment, no vllm import)."""
from __future__ import annotations

import torch
from conftest import VOCAB, make_model

from ouroboros.hf import real_slots
from ouroboros.hf.quantize import quantize_draft
from ouroboros.vllm.draft_head import HistoryHead, install_history_head
from ouroboros.vllm.draft_mode import row_guesses

X = torch.tensor([[3, 9, 4, 17, 30]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def test_the_head_scores_its_base_then_its_extra_ids_as_the_full_head_does():
    model, full = make_model("qwen2"), make_model("qwen2")
    head = install_history_head(model, [5, 0, 2, 40, 2])
    assert head.ids == [0, 2, 5, 40] and isinstance(model.get_output_embeddings(), HistoryHead)
    torch.testing.assert_close(_logits(model), _logits(full)[..., head.ids])
    assert head.track([[7, 8, 5], [VOCAB - 1, 8]]) and head.ids == [0, 2, 5, 40, 7, 8, VOCAB - 1]
    torch.testing.assert_close(_logits(model), _logits(full)[..., head.ids])
    assert model.get_input_embeddings().weight.shape[0] == VOCAB        # the input embeddings keep every token


def test_the_extra_rows_are_rebuilt_only_for_a_missing_token_and_follow_the_histories_then():
    head = install_history_head(make_model("llama"), range(10))
    assert not head.track([[1, 2, 3]]) and head.extra_ids == []       # all in the base: nothing to do
    assert head.track([[1, 20, 21]]) and head.extra_ids == [20, 21]
    assert not head.track([[20]]) and head.rebuilds == 1              # a request gone: kept until the next rebuild
    assert head.track([[20, 30]]) and head.extra_ids == [20, 30]      # rebuilt to exactly the histories' tokens


def test_an_int8_history_head_stays_close_to_the_float_head_and_rebuilds_in_int8():
    model, full = make_model("qwen2"), make_model("qwen2")
    head = install_history_head(model, range(VOCAB // 2))
    quantize_draft(model)
    extra = head.extra
    assert type(head.base).__name__ == "Linear" and "quantized" in type(head.base).__module__
    head.track([[VOCAB - 1, VOCAB - 3]])
    assert head.extra is extra and head.ids[-2:] == [VOCAB - 3, VOCAB - 1]
    ref = _logits(full)[..., head.ids]
    got = _logits(model)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()


def test_real_slot_forwards_installed_on_the_head_survive_a_rebuild():
    model, full = make_model("qwen2"), make_model("qwen2")
    head = install_history_head(model, range(VOCAB // 2))
    real_slots.install(model)
    head.track([[VOCAB - 1]])
    with real_slots.real_slots(model, [3], X.shape[1], torch.device("cpu")):
        got = _logits(model)[:, :3]
    torch.testing.assert_close(got, _logits(full)[:, :3, head.ids])
    real_slots.uninstall(model)


def test_each_row_verifies_fewer_pooled_phrases_as_more_requests_draft_together():
    assert [row_guesses(3, rows) for rows in (1, 2, 3, 4, 8)] == [3, 2, 1, 1, 1]
    assert row_guesses(1, 1) == 1 and row_guesses(4, 2) == 2 and row_guesses(3, 0) == 3
