# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""What is wrong with a checkpoint file that ``torch.load`` cannot read, said without PyTorch's noise.

PyTorch's messages do not name the file, and the weights-only reader's one advises loading again with
``weights_only=False``, which runs whatever code the file holds: the wrong advice for a corrupt download. Both
checkpoint loaders (``custom.engines.stages.load_weights``, ``custom.inference.runner.load_checkpoint``) raise
``UnreadableCheckpoint`` instead, naming the file and the problem.
"""

from __future__ import annotations

import os

__all__ = ["UnreadableCheckpoint", "load_problem"]


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that cannot be read: empty, truncated, corrupt, not a PyTorch checkpoint, or not readable."""

    def __init__(self, path: str | os.PathLike, err: BaseException, note: str = "") -> None:
        where = f" ({note})" if note else ""
        super().__init__(f"checkpoint {os.fspath(path)}{where} cannot be read: {load_problem(err)}")


def load_problem(err: BaseException) -> str:
    """The problem in ``torch.load``'s exception, in one line, without its advice to set ``weights_only=False``."""
    again = "; copy or save it again"
    if isinstance(err, OSError) and err.filename is not None:  # the file system's refusal (permissions, a folder)
        return err.strerror or str(err)
    if isinstance(err, EOFError):
        return f"the file is empty or truncated{again}"
    text = str(err)
    if isinstance(err, OSError) or "PytorchStreamReader" in text:  # torch's zip reader: EINVAL or its own message
        detail = text.split(". This is an internal", 1)[0].replace("PytorchStreamReader failed ", "")
        return f"it is not a complete PyTorch checkpoint archive, truncated or corrupted ({detail}){again}"
    if "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].split())
        return f"it is not a PyTorch checkpoint of plain weights ({detail}){again}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is not a PyTorch checkpoint ({type(err).__name__}{': ' + first if first else ''}){again}"
