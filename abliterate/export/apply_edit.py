"""Apply the chosen trial's edit to one full-precision tensor (a Linear weight, one expert, or an expert stack).

The math is stage 2's (``abliterate.edits.delta``), with the trial's method,
rank, SVD seed and saved direction, so the merge carries exactly the edit the
search evaluated. The merged value is formed as PEFT's ``merge_and_unload``
forms it: the fp32 delta added to the stored weight, rounded once to its dtype.
"""

from __future__ import annotations

import torch

from abliterate.artifacts import ChosenTrial
from abliterate.edits.delta import abliteration_delta
from abliterate.export.plan import TensorEdit


def edit_tensor(tensor: torch.Tensor, tensor_edit: TensorEdit, trial: ChosenTrial) -> torch.Tensor:
    """The edited copy of ``tensor`` in its own dtype (the input is not modified)."""
    record = tensor_edit.record
    delta = abliteration_delta(
        tensor,
        trial.directions[record.direction],
        record.strength,
        method=trial.method,
        rank=trial.rank,
        transposed=record.transposed,
        # An expert stored alone gets the seed its slot of the fused parameter gets in the search.
        seed=trial.svd_seed + (tensor_edit.expert or 0),
    )
    return (tensor.float() + delta).to(tensor.dtype)
