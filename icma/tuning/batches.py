"""Micro-batches for the training loop: what the loop needs of a training example (its token
ids and labels), padded as generation pads. Kept apart from ``icma.tuning.data`` (which
retrieves contexts and builds prompts) so the loop loads without RDKit or FAISS."""

from __future__ import annotations

from typing import Protocol, Sequence

IGNORE = -100  # label of positions without loss (torch's cross-entropy ignore_index)


class Tokenised(Protocol):
    input_ids: list[int]
    labels: list[int]


def collate(batch: Sequence[Tokenised], pad_id: int):
    """Right-padded tensors, labels -100 on padding, position ids from 0 on each example's
    first token (as ``generate`` numbers a prompt, whatever its padding).

    Right, not left as generation pads: a left-padded row's padding positions attend to nothing
    (every key up to them is padding), and CUDA's memory-efficient SDPA kernel gives such fully
    masked rows NaN gradients, which reach every weight: the first GPU run of
    ``benchmarks/icmt_device.py`` turned its losses NaN within ten steps. With right padding no
    row is fully masked, and a real token sees the same keys at the same positions as with left
    padding (causal attention, explicit position ids), so the loss is the same (a test sums
    single-example losses against a padded batch's)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    positions = torch.arange(width).expand(len(batch), width).clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": positions}
