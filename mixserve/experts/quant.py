"""Per-expert encodings of the expert store: one contiguous blob per expert, in one of five formats.

An expert is gate_up `[2 * inter, hidden]` and down `[hidden, inter]`. Its blob is a list of
sections, each starting at a multiple of `SECTION_ALIGN` bytes, laid out by `blob_layout` from the
format and the two shapes alone (so the manifest stores only the format per expert):

  float32 / bfloat16 / float16   gate_up, down                      (plain, bit-exact)
  int8                           gate_up_q, down_q (int8), gate_up_scale, down_scale (float32 per row)
  int4                           gate_up_q, down_q (uint8, two values per byte, low nibble first),
                                 gate_up_scale, down_scale (float32 per row per group of INT4_GROUP)

Quantization is symmetric (int8: round(w / s), s = max|row| / 127; int4: s = max|group| / 7,
values in [-8, 7] stored +8). `decode` is deterministic, so a cache that decodes on load gives
bitwise the same weights as an all-in-memory model that decoded once up front.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ExpertDtype = Literal["float32", "bfloat16", "float16", "int8", "int4"]
EXPERT_DTYPES: tuple[ExpertDtype, ...] = ("float32", "bfloat16", "float16", "int8", "int4")
SECTION_ALIGN = 64
"""Every section of a blob starts at a multiple of this many bytes (SIMD-friendly views)."""
INT4_GROUP = 32
"""Input columns sharing one int4 scale."""

_PLAIN = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Section:
    """One tensor inside a blob."""

    name: str
    """gate_up, down (plain) or gate_up_q, down_q, gate_up_scale, down_scale (quantized)."""
    dtype: torch.dtype
    """Stored element type."""
    shape: tuple[int, ...]
    """Stored shape."""
    offset: int
    """Byte offset from the start of the blob."""

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def _align(n: int, to: int) -> int:
    return -(-n // to) * to


def blob_layout(fmt: ExpertDtype, hidden_size: int, intermediate_size: int) -> list[Section]:
    """Sections of one expert's blob in format `fmt` (raises ValueError for int4 shapes that do not
    divide into INT4_GROUP columns)."""
    gu, dn = (2 * intermediate_size, hidden_size), (hidden_size, intermediate_size)
    parts: list[tuple[str, torch.dtype, tuple[int, ...]]]
    if fmt in _PLAIN:
        parts = [("gate_up", _PLAIN[fmt], gu), ("down", _PLAIN[fmt], dn)]
    elif fmt == "int8":
        parts = [("gate_up_q", torch.int8, gu), ("down_q", torch.int8, dn),
                 ("gate_up_scale", torch.float32, (gu[0],)), ("down_scale", torch.float32, (dn[0],))]
    elif fmt == "int4":
        for rows, cols in (gu, dn):
            if cols % INT4_GROUP:
                raise ValueError(f"int4 experts need input widths divisible by {INT4_GROUP}; got "
                                 f"[{rows}, {cols}]")
        parts = [("gate_up_q", torch.uint8, (gu[0], gu[1] // 2)), ("down_q", torch.uint8, (dn[0], dn[1] // 2)),
                 ("gate_up_scale", torch.float32, (gu[0], gu[1] // INT4_GROUP)),
                 ("down_scale", torch.float32, (dn[0], dn[1] // INT4_GROUP))]
    else:
        raise ValueError(f"unknown expert dtype {fmt!r}; expected one of {', '.join(EXPERT_DTYPES)}")
    sections, offset = [], 0
    for name, dtype, shape in parts:
        section = Section(name, dtype, shape, offset)
        sections.append(section)
        offset = _align(offset + section.nbytes, SECTION_ALIGN)
    return sections


def blob_nbytes(layout: list[Section]) -> int:
    """Bytes of a blob with `layout` (end of its last section)."""
    last = layout[-1]
    return last.offset + last.nbytes


def _quant_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def _quant_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = w.shape
    groups = w.float().reshape(rows, cols // INT4_GROUP, INT4_GROUP)
    scale = groups.abs().amax(dim=2).clamp(min=1e-12) / 7.0  # [rows, cols / INT4_GROUP]
    q = (torch.round(groups / scale[..., None]).clamp(-8, 7) + 8).to(torch.uint8).reshape(rows, cols)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def encode(fmt: ExpertDtype, gate_up: torch.Tensor, down: torch.Tensor) -> bytes:
    """The blob of one expert (`blob_nbytes` long; padding between sections is zero)."""
    layout = blob_layout(fmt, down.shape[0], down.shape[1])
    if fmt in _PLAIN:
        tensors = [gate_up.to(_PLAIN[fmt]), down.to(_PLAIN[fmt])]
    else:
        quant = _quant_int8 if fmt == "int8" else _quant_int4
        (gu_q, gu_s), (dn_q, dn_s) = quant(gate_up), quant(down)
        tensors = [gu_q, dn_q, gu_s, dn_s]
    out = bytearray(blob_nbytes(layout))
    for section, t in zip(layout, tensors):
        if tuple(t.shape) != section.shape:
            raise ValueError(f"expert {section.name} has shape {tuple(t.shape)}, expected {section.shape}")
        raw = t.contiguous().view(torch.uint8).flatten().numpy().tobytes()
        out[section.offset:section.offset + len(raw)] = raw
    return bytes(out)


def _view(raw: torch.Tensor, s: Section) -> torch.Tensor:
    return raw[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)


def _dequant_int4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    q = torch.stack([(packed & 15), (packed >> 4)], dim=-1).reshape(rows, -1).to(torch.float32) - 8.0
    return (q.reshape(rows, -1, INT4_GROUP) * scale[..., None]).reshape(rows, -1)


def decode(raw: torch.Tensor, layout: list[Section], out_dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up, down) in `out_dtype` from a blob held in `raw` (`[>= blob_nbytes]` uint8).

    Plain blobs already in `out_dtype` come back as zero-copy views of `raw`; everything else is
    a fresh tensor (converted or dequantized)."""
    if layout[0].name == "gate_up":
        gate_up, down = _view(raw, layout[0]), _view(raw, layout[1])
        return gate_up.to(out_dtype), down.to(out_dtype)
    gu_q, dn_q, gu_s, dn_s = (_view(raw, s) for s in layout)
    if gu_q.dtype == torch.int8:
        return ((gu_q.to(torch.float32) * gu_s[:, None]).to(out_dtype),
                (dn_q.to(torch.float32) * dn_s[:, None]).to(out_dtype))
    return _dequant_int4(gu_q, gu_s).to(out_dtype), _dequant_int4(dn_q, dn_s).to(out_dtype)


def decoded_nbytes(layout: list[Section], out_dtype: torch.dtype) -> int:
    """Extra bytes `decode` allocates beyond the raw blob (0 when it returns views)."""
    if layout[0].name == "gate_up" and layout[0].dtype == out_dtype:
        return 0
    elem = torch.empty((), dtype=out_dtype).element_size()
    gu, dn = layout[0].shape, layout[1].shape
    gu_cols = gu[1] * (2 if layout[0].dtype == torch.uint8 else 1)
    dn_cols = dn[1] * (2 if layout[1].dtype == torch.uint8 else 1)
    return (gu[0] * gu_cols + dn[0] * dn_cols) * elem
