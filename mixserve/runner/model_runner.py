"""SchedulerOutput -> tensors -> model -> logits -> sampler -> RunnerOutput.

The runner owns the KV cache tensors (one `[num_slots, num_kv_heads, head_dim]` pair per layer)
and the per-request random generators. Sequences are regrouped for attention: every single-token
(decode) sequence in one group, each longer chunk in its own, so decodes are never padded to a
prefill's length.
"""

from __future__ import annotations

import torch

from mixserve.engine.engine import RunnerOutput
from mixserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.runner.batch import build_group
from mixserve.sample import Sampler, SamplingRow, prompt_logprobs


def kv_bytes_per_block(shapes: list[tuple[int, int]], block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return sum(2 * block_size * heads * dim * elem for heads, dim in shapes)


def allocate_kv_caches(shapes: list[tuple[int, int]], num_blocks: int, block_size: int,
                       dtype: torch.dtype) -> list[KVCache]:
    slots = num_blocks * block_size
    return [(torch.zeros(slots, h, d, dtype=dtype), torch.zeros(slots, h, d, dtype=dtype))
            for h, d in shapes]


class TorchModelRunner:
    """Executes scheduled steps on a `CausalLM` module (see `mixserve.models.base`)."""

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, dtype: torch.dtype,
                 eos_token_ids: tuple[int, ...], seed: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.dtype = dtype
        self.kv_caches = allocate_kv_caches(model.kv_cache_shapes(),  # type: ignore[operator]
                                            num_blocks, block_size, dtype)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.generators: dict[str, torch.Generator] = {}

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for rid in out.finished_request_ids:
            self.generators.pop(rid, None)
        self._copy_blocks(out)
        seqs = sorted(out.seqs, key=lambda s: s.num_tokens != 1)  # decodes first, stable
        input_ids, positions, meta = self._prepare(seqs)
        hidden = self.model(input_ids, positions, meta, self.kv_caches)
        return self._sample(seqs, hidden)

    def _copy_blocks(self, out: SchedulerOutput) -> None:
        if not out.copies:
            return
        bs = self.block_size
        src = torch.cat([torch.arange(c.src * bs, (c.src + 1) * bs) for c in out.copies])
        dst = torch.cat([torch.arange(c.dst * bs, (c.dst + 1) * bs) for c in out.copies])
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    def _prepare(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for seq in seqs:
            ids.extend(seq.token_ids)
            table = seq.block_ids
            for p in range(seq.start_pos, seq.start_pos + seq.num_tokens):
                pos.append(p)
                slots.append(table[p // bs] * bs + p % bs)
        num_decode = sum(1 for s in seqs if s.num_tokens == 1)
        groups = []
        if num_decode:
            groups.append(build_group(seqs[:num_decode], bs))
        groups.extend(build_group([s], bs) for s in seqs[num_decode:])
        slot_mapping = torch.tensor(slots, dtype=torch.long)
        if len(groups) == 1:
            meta = groups[0]
            meta.slot_mapping = slot_mapping
        else:
            meta = AttentionMetadata(query_lens=[s.num_tokens for s in seqs],
                                     seq_lens=[s.start_pos + s.num_tokens for s in seqs],
                                     slot_mapping=slot_mapping, kv_slots=None, q_index=None, groups=groups)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), meta

    def _sample(self, seqs: list[ScheduledSeq], hidden: torch.Tensor) -> RunnerOutput:
        result = RunnerOutput()
        rows: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSeq] = []
        prompt_rows: list[tuple[ScheduledSeq, int, int]] = []  # seq, first row, count
        offset = 0
        for seq in seqs:
            spec = seq.spec
            if spec.params.prompt_logprobs is not None and seq.start_pos < seq.num_prompt_tokens:
                count = min(seq.num_tokens, seq.num_prompt_tokens - 1 - seq.start_pos)
                if count > 0:
                    prompt_rows.append((seq, len(rows), count))
                    rows.extend(range(offset, offset + count))
            if seq.sample:
                sample_seqs.append(seq)
                sample_rows.append(offset + seq.num_tokens - 1)
            offset += seq.num_tokens
        rows.extend(sample_rows)
        if not rows:
            return result
        logits = self.model.compute_logits(hidden[torch.tensor(rows)])  # type: ignore[operator]
        for seq, first, count in prompt_rows:
            nexts = list(seq.prompt_token_ids[seq.start_pos + 1:seq.start_pos + 1 + count])
            num_logprobs = seq.spec.params.prompt_logprobs
            assert num_logprobs is not None
            result.prompt_logprobs[seq.request_id] = prompt_logprobs(
                logits[first:first + count], nexts, num_logprobs)
        if sample_seqs:
            sample_logits = logits[len(rows) - len(sample_seqs):]
            sampled = self.sampler(sample_logits, [self._row(s) for s in sample_seqs])
            for seq, token, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs):
                result.sampled[seq.request_id] = token
                if lp is not None:
                    result.logprobs[seq.request_id] = lp
        return result

    def _row(self, seq: ScheduledSeq) -> SamplingRow:
        """The sampler's row for a sequence; its generator is seeded once with the spec's seed."""
        spec = seq.spec
        generator = None
        if spec.seed is not None:
            generator = self.generators.get(seq.request_id)
            if generator is None:
                generator = torch.Generator().manual_seed(spec.seed)
                self.generators[seq.request_id] = generator
        return SamplingRow(params=spec.params, prompt_token_ids=seq.prompt_token_ids,
                           output_token_ids=seq.output_token_ids, generator=generator,
                           suppress_token_ids=spec.suppress_token_ids)
