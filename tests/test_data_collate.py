"""Collators: padding side, label masking and item counts (align_runner.data.collate)."""

from __future__ import annotations

import pytest
import torch

from align_runner.data.collate import collate_preference, collate_prompts, collate_sft

PAD = 0


def test_sft_right_pads_and_masks_labels():
    examples = [
        {"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [9, 10], "loss_mask": [1, 1]},
    ]
    batch = collate_sft(examples, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8], [9, 10, -100, -100]]
    assert batch["input_ids"].dtype == torch.long and batch["labels"].dtype == torch.long
    # Targets after the shift: row 0 -> 7, 8; row 1 -> 10 (token 9 at position 0 is never predicted).
    assert batch["num_items"] == 3 and isinstance(batch["num_items"], int)


def test_sft_pad_token_equal_to_a_real_token_is_still_masked():
    # pad_id 7 also appears as a trained token: labels must follow loss_mask/padding, not the value.
    batch = collate_sft([{"input_ids": [1, 7], "loss_mask": [1, 1]}, {"input_ids": [1], "loss_mask": [1]}], 7)
    assert batch["labels"].tolist() == [[1, 7], [1, -100]]
    assert batch["num_items"] == 1


def test_sft_pad_to_multiple_of():
    batch = collate_sft([{"input_ids": [1, 2, 3], "loss_mask": [1, 1, 1]}], PAD, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"].sum() == 3


def test_preference_stacks_chosen_then_rejected():
    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10]},
    ]
    batch = collate_preference(examples, PAD)
    assert batch["input_ids"].tolist() == [
        [1, 2, 3, 4, 5],  # pair 0 chosen
        [7, 8, 0, 0, 0],  # pair 1 chosen
        [1, 2, 6, 0, 0],  # pair 0 rejected
        [7, 9, 10, 0, 0],  # pair 1 rejected
    ]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]
    assert batch["num_items"] == 2
    chosen, rejected = batch["input_ids"].chunk(2)
    assert chosen[0].tolist()[:5] == [1, 2, 3, 4, 5] and rejected[1].tolist()[:3] == [7, 9, 10]


def test_preference_extra_fields():
    examples = [
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logps": -1.5, "id": "a"},
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logps": -2.0, "id": "b"},
    ]
    batch = collate_preference(examples, PAD)
    assert torch.equal(batch["ref_chosen_logps"], torch.tensor([-1.5, -2.0]))
    assert batch["id"] == ["a", "b"]


def test_prompts_are_left_padded_with_other_fields_as_lists():
    examples = [
        {"prompt_ids": [5, 6, 7], "prompt_text": "x y z", "answer": "4"},
        {"prompt_ids": [8], "prompt_text": "w", "answer": "6"},
    ]
    batch = collate_prompts(examples, PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["prompt_text"] == ["x y z", "w"] and batch["answer"] == ["4", "6"]
    assert "prompt_ids" not in batch


def test_prompt_fields_missing_in_some_examples_become_none():
    batch = collate_prompts([{"prompt_ids": [1], "answer": 3}, {"prompt_ids": [2]}], PAD)
    assert batch["answer"] == [3, None]


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty list"):
        collate_sft([], PAD)
    with pytest.raises(ValueError, match="pad_id must be an int token id"):
        collate_prompts([{"prompt_ids": [1]}], None)


def test_budget_lengths_are_the_padded_tokens_of_an_example():
    from align_runner.data.collate import pair_tokens, sft_tokens

    assert sft_tokens({"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1]}) == 3
    # two rows (chosen, rejected) as wide as prompt + the longer response: 2 x (2 + 3)
    assert pair_tokens({"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}) == 10
    batch = collate_preference([{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}], PAD)
    assert batch["input_ids"].numel() == 10


def test_packed_sft_rows_grow_for_an_example_longer_than_the_budget():
    from align_runner.data.collate import collate_packed_sft

    batch = collate_packed_sft([{"input_ids": [1, 2, 3, 4], "loss_mask": [1] * 4}, {"input_ids": [5], "loss_mask": [1]}], PAD, max_tokens=2)
    # rows are as long as the longest example (4 > 2); it fills one, the 1-token example starts another
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_preference_collator_pads_or_packs_as_the_train_settings_say():
    from align_runner.data.collate import preference_collator

    examples = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]},
        {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10]},
    ]
    padded = preference_collator(PAD, packing=False, max_tokens=16)(examples)
    assert padded["input_ids"].shape == (4, 5) and "position_ids" not in padded
    packed = preference_collator(PAD, packing=True, max_tokens=16)(examples)
    # the four sequences (5 + 2 + 3 + 3 = 13 tokens) fit one row of 16, positions restarting per sequence
    assert packed["input_ids"].shape[0] == 1
    assert int((packed["sequence_ids"] >= 0).sum()) == 13 and packed["num_items"] == 2
    assert sorted(packed["position_ids"][0].tolist()).count(0) >= 4
