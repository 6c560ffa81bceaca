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
    """Left-padded tensors (as generation pads), labels -100 on padding, and position ids that
    start at 0 on each example's first real token (as ``generate`` numbers a left-padded
    prompt), so training sees the positions serving will."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, width - n:] = torch.tensor(e.input_ids)
        labels[i, width - n:] = torch.tensor(e.labels)
        mask[i, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels,
            "position_ids": positions}
