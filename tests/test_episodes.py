"""The episode engine (issue 18 item 2): the turn iterator, the row-masked memory update and the sequence
log-probs that stage 3, stage 4 and the evaluation share."""

import pytest
import torch

from rxt_factories import tiny_model
from transformers_rxt.training.episodes import compute_memory_update, iter_turns, sequence_log_probs, trim_padding


def episode_batch(lengths, turn_mask, width=10, vocab=96, seed=0):
    """[B, N, width] right-padded turns: row b's turn k has lengths[b][k] tokens (0 = padding)."""
    generator = torch.Generator().manual_seed(seed)
    batch, turns = len(lengths), len(lengths[0])
    ids = torch.randint(5, vocab, (batch, turns, width), generator=generator)
    mask = torch.zeros(batch, turns, width, dtype=torch.long)
    for b in range(batch):
        for k in range(turns):
            mask[b, k, : lengths[b][k]] = 1
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    return ids * mask, mask, torch.tensor(turn_mask), labels


def test_iter_turns_cuts_each_turn_to_its_longest_row_and_stops_at_the_first_missing_turn():
    ids, mask, turn_mask, labels = episode_batch([[3, 6, 2, 0], [5, 0, 0, 0]], [[1, 1, 1, 0], [1, 0, 0, 0]])
    turns = list(iter_turns(ids, mask, turn_mask, labels))
    assert [t.index for t in turns] == [0, 1, 2]
    assert [t.input_ids.shape[1] for t in turns] == [5, 6, 2]
    assert [t.valid.tolist() for t in turns] == [[True, True], [True, False], [True, False]]
    for t in turns:
        assert torch.equal(t.input_ids, ids[:, t.index, : t.input_ids.shape[1]])
        assert torch.equal(t.labels, labels[:, t.index, : t.input_ids.shape[1]])
        assert int(t.attention_mask.sum()) == int(mask[:, t.index].sum())  # only padding was cut
    assert [t.index for t in iter_turns(ids, mask, torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0]]))] == []
    assert all(t.labels is None for t in iter_turns(ids, mask, turn_mask))


def test_trim_padding_keeps_one_column_of_an_all_padding_turn():
    mask = torch.zeros(2, 7, dtype=torch.long)
    cut_mask, cut_ids = trim_padding(mask, torch.ones(2, 7, dtype=torch.long))
    assert cut_mask.shape == cut_ids.shape == (2, 1)


def test_memory_update_writes_only_the_selected_rows():
    model = tiny_model()
    ids, mask, _, _ = episode_batch([[4], [7], [5]], [[1], [1], [1]])
    ids, mask = ids[:, 0], mask[:, 0]
    memory = model.initial_memory_tensor(3, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([True, False, True])
    with torch.no_grad():
        new = compute_memory_update(model, ids, mask, memory, rows)
        alone = model.compute_memory_update(ids[[0, 2], :7], mask[[0, 2], :7], memory[[0, 2]])
        everyone = compute_memory_update(model, ids, mask, memory)
        everyone_by_hand = model.compute_memory_update(ids[:, :7], mask[:, :7], memory)
    assert torch.equal(new[1], memory[1])  # the unselected row keeps its memory exactly
    assert torch.equal(new[[0, 2]], alone)  # the selected rows: their own update, cut to the batch's longest row
    assert not torch.equal(new[0], memory[0])
    assert torch.equal(everyone, everyone_by_hand)
    with torch.no_grad():
        assert torch.equal(compute_memory_update(model, ids, mask, memory, torch.ones(3, dtype=torch.bool)),
                           everyone)


def test_memory_update_is_differentiable_through_the_selected_rows_only():
    model = tiny_model()
    ids, mask, _, _ = episode_batch([[4], [6]], [[1], [1]])
    memory = model.initial_memory_tensor(2, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    compute_memory_update(model, ids[:, 0], mask[:, 0], memory, torch.tensor([False, True])).sum().backward()
    assert torch.equal(memory.grad[0], torch.ones_like(memory[0]))  # passed through unchanged
    assert not torch.equal(memory.grad[1], torch.ones_like(memory[1]))  # through the memory attention
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.memory_attention.parameters())


def test_sequence_log_probs_score_the_labels_only():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 7, 8, -100, -100, -100]])
    token, counts = sequence_log_probs(logits, labels)
    assert token.shape == (2, 5) and counts.tolist() == [3, 2]
    expected = -torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1),
                                                  reduction="none").view(2, 5)
    torch.testing.assert_close(token, expected, rtol=0, atol=1e-6)  # cross_entropy gives 0 where ignored
    assert token[labels[:, 1:] == -100].eq(0).all()
    with pytest.raises(ValueError, match=r"labels \(2, 4\) do not match the logits' positions \(2, 6\)"):
        sequence_log_probs(logits, labels[:, :4])


def test_sequence_log_probs_are_trls_selective_log_softmax_to_the_bit():
    """IMPO's policy, reference and rollout log-probs come from the engine's helper; they are TRL's (its
    ``selective_log_softmax``) bit for bit, so IMPO's GRPO loss sees what TRL's own GRPO would compute."""
    from trl.trainer.utils import selective_log_softmax

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 9, 300, generator=generator) * 4
    ids = torch.randint(0, 300, (5, 9), generator=generator)
    aligned, counts = sequence_log_probs(logits[:, :-1], ids[:, 1:], shift=False)
    assert torch.equal(aligned, selective_log_softmax(logits[:, :-1], ids[:, 1:])) and counts.tolist() == [8] * 5
    shifted, _ = sequence_log_probs(logits, ids)
    assert torch.equal(shifted, aligned)
    with pytest.raises(ValueError, match=r"labels \(5, 9\) do not match the logits' positions \(5, 8\)"):
        sequence_log_probs(logits[:, :-1], ids, shift=False)
