"""The one error type of `mixserve.loading` (re-exported by `checkpoint`)."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint (folder, safetensors, GGUF, tokenizer files) is missing, corrupt or unsupported.

    The message always names the file and the problem.
    """
