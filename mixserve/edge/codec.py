"""Hidden-state codecs for the edge -> cloud link: `[num_tokens, hidden_size]` float rows <-> bytes.

- `fp32`: the rows as they are (the split is then bitwise the whole model);
- `fp16`: half the bytes (CE-CoLLM's "quantization"); values beyond fp16's range are clamped;
- `int8`: one byte per channel plus one float32 absmax scale per token (row):
  `q = round(h / s)`, `s = max|h_row| / 127`, decoded as `q * s`.
"""

from __future__ import annotations

import enum

import numpy as np
import torch

_FP16_MAX = 65504.0


class Codec(enum.IntEnum):
    """How hidden states are packed in an UPLOAD frame (the value is the wire byte)."""

    FP32 = 0
    FP16 = 1
    INT8 = 2

    @staticmethod
    def parse(name: str) -> Codec:
        try:
            return Codec[name.upper()]
        except KeyError:
            raise ValueError(f"unknown hidden-state codec {name!r}: choose fp32, fp16 or int8") from None

    def bytes_per_token(self, hidden_size: int) -> int:
        """Payload bytes of one position."""
        if self is Codec.FP32:
            return 4 * hidden_size
        if self is Codec.FP16:
            return 2 * hidden_size
        return hidden_size + 4


def encode_hidden(hidden: torch.Tensor, codec: Codec) -> bytes:
    """`[num_tokens, hidden_size]` -> payload bytes (little-endian)."""
    h = hidden.detach().to(torch.float32).contiguous()
    if codec is Codec.FP32:
        return h.numpy().astype("<f4", copy=False).tobytes()
    if codec is Codec.FP16:
        return h.clamp(-_FP16_MAX, _FP16_MAX).numpy().astype("<f2").tobytes()
    scale = h.abs().amax(dim=1).clamp_min(1e-12) / 127.0  # [num_tokens]
    q = torch.round(h / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return scale.numpy().astype("<f4").tobytes() + q.numpy().tobytes()


def decode_hidden(payload: bytes, codec: Codec, num_tokens: int, hidden_size: int) -> torch.Tensor:
    """Payload bytes -> `[num_tokens, hidden_size]` float32; raises ValueError on a size mismatch."""
    want = num_tokens * codec.bytes_per_token(hidden_size)
    if len(payload) != want:
        raise ValueError(f"{codec.name.lower()} payload of {len(payload)} bytes for {num_tokens} token(s) "
                         f"of hidden size {hidden_size}; expected {want}")
    if codec is Codec.FP32:
        arr = np.frombuffer(payload, dtype="<f4").astype(np.float32)
        return torch.from_numpy(arr.reshape(num_tokens, hidden_size))
    if codec is Codec.FP16:
        arr = np.frombuffer(payload, dtype="<f2").astype(np.float32)
        return torch.from_numpy(arr.reshape(num_tokens, hidden_size))
    scale = torch.from_numpy(np.frombuffer(payload[:4 * num_tokens], dtype="<f4").astype(np.float32))
    q = np.frombuffer(payload[4 * num_tokens:], dtype=np.int8).astype(np.float32)
    return torch.from_numpy(q.reshape(num_tokens, hidden_size)) * scale[:, None]
