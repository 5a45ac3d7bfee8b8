"""Baseline expert providers for the MoE budget benchmark (not part of the library).

- `MmapExpertProvider`: zero-copy views into the memory-mapped safetensors checkpoint; the OS page
  cache is the only cache (what llama.cpp and KTransformers fall back to). Under a cgroup memory
  limit the kernel evicts expert pages as needed.
- `OnDemandProvider`: reads every requested expert from the expert pack on every use, in waves that
  fit the same per-layer budget, and keeps nothing (load on demand, no cache, no prediction).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from mixserve.experts.cache import plan_capacity
from mixserve.experts.iopool import DEMAND, IOPool
from mixserve.experts.provider import ExpertWeights
from mixserve.experts.quant import decode
from mixserve.experts.store import ExpertStore, aligned_buffer


class MmapExpertProvider:
    """Experts as views of the mmap'd fused tensors `mlp.experts.{gate_up_proj,down_proj}` (bf16)."""

    def __init__(self, folder: Path) -> None:
        index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
        self.gate_up: dict[int, torch.Tensor] = {}
        self.down: dict[int, torch.Tensor] = {}
        self._maps: list[np.memmap] = []
        for name, shard in index.items():
            if ".mlp.experts." not in name:
                continue
            layer_idx = int(name.split(".")[2])
            target = self.gate_up if name.endswith("gate_up_proj") else self.down
            target[layer_idx] = self._view(folder / shard, name)

    def _view(self, path: Path, name: str) -> torch.Tensor:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[name]
        if info["dtype"] != "BF16":
            raise ValueError(f"{path}: {name} is {info['dtype']}, the mmap baseline expects BF16")
        start, end = info["data_offsets"]
        arr = np.memmap(path, dtype=np.uint16, mode="c", offset=8 + n + start, shape=((end - start) // 2,))
        self._maps.append(arr)
        return torch.from_numpy(arr).view(torch.bfloat16).view(info["shape"])

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             active_ids: list[int]) -> list[list[int]]:
        return [list(active_ids)]

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        return ExpertWeights(layer_idx, list(expert_ids), [self.gate_up[layer_idx][e] for e in expert_ids],
                             [self.down[layer_idx][e] for e in expert_ids])

    def release(self, weights: ExpertWeights) -> None:
        pass


class OnDemandProvider:
    """Every `get` reads its experts from the pack (parallel reads), nothing is kept after `release`."""

    def __init__(self, store: ExpertStore, budget_nbytes: int, dtype: torch.dtype, io_threads: int) -> None:
        self.store = store
        self.dtype = dtype
        slot = {i: store.max_padded_nbytes(i) for i in store.layer_ids}
        self.capacity = plan_capacity(store.layer_ids, store.num_experts, slot, budget_nbytes)
        self.io = IOPool(io_threads)
        self.bytes_read = 0
        self.requests = 0
        self.stall_seconds = 0.0

    def plan(self, layer_idx: int, x: torch.Tensor, topk_ids: torch.Tensor,
             active_ids: list[int]) -> list[list[int]]:
        cap = self.capacity[layer_idx]
        return [active_ids[i:i + cap] for i in range(0, len(active_ids), cap)]

    def _read(self, layer_idx: int, expert_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.store.entry(layer_idx, expert_id)
        buf = aligned_buffer(entry.padded_nbytes)
        self.store.read_into(entry, buf)
        return decode(buf, list(entry.layout), self.dtype)

    def get(self, layer_idx: int, expert_ids: list[int]) -> ExpertWeights:
        import time

        futures = [self.io.submit(DEMAND, lambda e=e: self._read(layer_idx, e)) for e in expert_ids]
        start = time.perf_counter()
        loaded = [f.result() for f in futures]
        self.stall_seconds += time.perf_counter() - start
        self.requests += len(expert_ids)
        self.bytes_read += sum(self.store.entry(layer_idx, e).nbytes for e in expert_ids)
        return ExpertWeights(layer_idx, list(expert_ids), [w[0] for w in loaded], [w[1] for w in loaded])

    def release(self, weights: ExpertWeights) -> None:
        pass

    def close(self) -> None:
        self.io.close()
