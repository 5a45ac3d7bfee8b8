"""KV-block migration between engines (Llumnix-style live migration): export a running sample's full KV
blocks from one engine, import them into another as prefix-cache entries.

An export is plain data (`KVExport`: the block size, the tokens of the full computed blocks, and the
runner's per-layer K/V of those blocks), picklable, so it crosses processes through Ray's object store.
An import allocates free blocks, has the runner write the K/V into them, registers each under the chain
hash *the importing engine* computes from the tokens (hashes never cross processes), then frees them:
they sit in the prefix cache as evictable blocks at the most-recently-freed end of the free queue. A
request resumed there (`ResumePoint`) then hits every full block and computes only the last partial one.

Only control plane lives here; the bytes move through one runner call each way (`KVBlockIO`). An import
that cannot be taken (prefix caching off, another block size, no room, a runner without block I/O, K/V
of other shapes or dtype: another model or KV format) imports nothing and says why: the resume then
recomputes, never a wrong answer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from mixserve.engine.engine import Engine

log = logging.getLogger("mixserve.engine")


@dataclass(frozen=True)
class KVExport:
    """The full computed KV blocks of one sample: block `i` holds `token_ids[i*bs:(i+1)*bs]`."""

    block_size: int
    token_ids: tuple[int, ...]
    """A whole number of blocks: the prefix of the sample's tokens whose KV is exported."""
    blocks: Any
    """The runner's payload (`TorchModelRunner`: per layer, K and V tensors `[num_blocks, block_size, ...]`)."""

    @property
    def num_blocks(self) -> int:
        return len(self.token_ids) // self.block_size

    @property
    def nbytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for kv in self.blocks for t in kv)


@runtime_checkable
class KVBlockIO(Protocol):
    """What a runner offers for KV migration (runners without it: exports are None, imports refused)."""

    def read_blocks(self, block_ids: list[int]) -> Any:
        """The K/V of `block_ids`, in that order, as plain (picklable) data."""
        ...

    def write_blocks(self, block_ids: list[int], blocks: Any, rows: list[int]) -> None:
        """Write rows `rows` of a `read_blocks` payload into `block_ids`; ValueError (nothing written) when
        the payload does not fit this runner's cache (layers, shapes, dtype)."""
        ...


def export_kv(engine: Engine, request_id: str, sample_index: int = 0) -> KVExport | None:
    """The full computed blocks of a live sample (None: its runner has no block I/O, or no full block).
    Raises the engine's RequestError when the sample is not live."""
    request = engine._live_sample(request_id, sample_index)
    runner = engine.runner
    if not isinstance(runner, KVBlockIO):
        return None
    kv = engine.scheduler.kv
    table = kv.block_tables.get(request.request_id, [])
    num_full = min(request.num_computed_tokens // kv.block_size, len(table))
    if num_full == 0:
        return None
    return KVExport(kv.block_size, tuple(request.token_ids[:num_full * kv.block_size]),
                    runner.read_blocks(table[:num_full]))


def import_kv(engine: Engine, export: KVExport) -> int:
    """Put `export`'s blocks into this engine's prefix cache; returns the tokens whose KV it now holds from
    the export (0: refused, one log line says why)."""
    reason = _refusal(engine, export)
    if reason is None:
        runner = engine.runner
        assert isinstance(runner, KVBlockIO)
        try:
            imported = engine.scheduler.kv.import_prefix(
                list(export.token_ids), lambda ids, rows: runner.write_blocks(ids, export.blocks, rows))
        except (ValueError, RuntimeError, TypeError) as exc:
            reason = str(exc)
        else:
            engine.counters["migrated_kv_tokens"] += imported
            return imported
    engine.counters["kv_imports_refused"] += 1
    log.warning("KV import of %d tokens refused (the resume recomputes them): %s", len(export.token_ids), reason)
    return 0


def _refusal(engine: Engine, export: KVExport) -> str | None:
    kv = engine.scheduler.kv
    if not isinstance(export, KVExport):
        return f"not a KVExport: {type(export).__name__}"
    if not kv.enable_prefix_caching:
        return "prefix caching is off on this engine"
    if export.block_size != kv.block_size:
        return f"block_size {export.block_size} differs from this engine's {kv.block_size}"
    if len(export.token_ids) % export.block_size:
        return f"token_ids has {len(export.token_ids)} tokens, not a whole number of blocks"
    if not isinstance(engine.runner, KVBlockIO):
        return "this engine's runner has no KV block I/O"
    return None


__all__ = ["KVBlockIO", "KVExport", "export_kv", "import_kv"]
