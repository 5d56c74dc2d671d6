"""checkpoint_policy: which epoch of stage 1 becomes the MIL teacher (the swap's side is in test_role_swap.py)."""

import pytest
import torch

from custom.engines import CHECKPOINT_POLICIES, stage1_model_path
from custom.engines.stages import LAST_PREFIX


def test_best_is_the_best_checkpoint_and_last_the_newest_final_epoch_file(tmp_path):
    best = tmp_path / "teacher_best.pt"
    assert CHECKPOINT_POLICIES == ("best", "last")
    assert stage1_model_path(tmp_path, best, "best") == best
    with pytest.raises(FileNotFoundError, match="--checkpoint_policy best"):
        stage1_model_path(tmp_path, best, "last")
    for epoch in (9, 11, 10):  # numeric order, not text order
        torch.save({"teacher": {}}, tmp_path / f"{LAST_PREFIX}_checkpoint_epoch={epoch}.pt")
    assert stage1_model_path(tmp_path, best, "last") == tmp_path / "teacher_last_checkpoint_epoch=11.pt"
    with pytest.raises(ValueError, match="checkpoint_policy must be one of"):
        stage1_model_path(tmp_path, best, "middle")
