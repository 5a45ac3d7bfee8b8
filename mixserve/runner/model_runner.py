"""SchedulerOutput -> tensors -> model -> logits -> sampler -> RunnerOutput.

The runner owns the KV cache tensors of its layers (per layer, K `[num_slots, num_kv_heads,
k_head_size]` and V `[num_slots, num_kv_heads, v_head_size]`, from the model's `KVCacheSpec`); seeded
rows sample from per-position generators (`sample.seeding`). Sequences are regrouped for attention:
every single-token (decode) sequence in one group, each longer chunk in its own, so decodes are never
padded to a prefill's length.

A runner owns a contiguous layer range `[start, end)` of the model (all of it by default). The one
owning layer 0 embeds the step's tokens, any other takes the previous stage's `StageBoundary`; the
one owning the last layer samples (`execute`), any other hands its hidden states on (`execute_stage`).
"""

from __future__ import annotations

import torch

from mixserve.engine.engine import RunnerOutput
from mixserve.engine.scheduler import ScheduledSeq, SchedulerOutput
from mixserve.layers.attention import AttentionMetadata, KVCache
from mixserve.layers.invariant import InvariantAttention
from mixserve.models.base import CausalLM, KVCacheSpec
from mixserve.runner.batch import build_group
from mixserve.runner.stage import StageBoundary, batch_order
from mixserve.sample import Sampler, SamplingRow, prompt_logprobs
from mixserve.sample.seeding import position_generator
from mixserve.structured.constraints import Constraints, StepMasks


def kv_bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of K and V for one block across the layers of `spec`."""
    return block_size * spec.bytes_per_token(torch.empty((), dtype=dtype).element_size())


def allocate_kv_caches(spec: KVCacheSpec, num_blocks: int, block_size: int,
                       dtype: torch.dtype) -> list[KVCache]:
    """One zeroed (K, V) pair per layer of `spec`, in layer order."""
    slots = num_blocks * block_size
    return [(torch.zeros(slots, s.num_kv_heads, s.k_head_size, dtype=dtype),
             torch.zeros(slots, s.num_kv_heads, s.v_head_size, dtype=dtype)) for s in spec.layers]


class TorchModelRunner:
    """Executes scheduled steps on the layers `[start, end)` of a `CausalLM` (`layers`, default all)."""

    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 eos_token_ids: tuple[int, ...], seed: int = 0, layers: tuple[int, int] | None = None,
                 constraints: Constraints | None = None, batch_invariant: bool = False) -> None:
        self.model = model
        self.batch_invariant = batch_invariant
        """Attend through `InvariantAttention` (the model's modules are switched by the builder)."""
        self.block_size = block_size
        self.dtype = dtype
        spec = model.kv_cache_spec()
        self.num_layers = spec.end
        self.kv_spec = spec if layers is None else spec.slice(*layers)
        self.start, self.end = self.kv_spec.start, self.kv_spec.end
        self.kv_caches = allocate_kv_caches(self.kv_spec, num_blocks, block_size, dtype)
        self.eos_token_ids = eos_token_ids
        self.sampler = Sampler(torch.Generator().manual_seed(seed))
        self.constraints = constraints
        """Structured-output states of live requests (None: constraints are rejected per request)."""

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput | StageBoundary) -> RunnerOutput:
        """Run this runner's layers on one step and sample; the runner must own the last layer.
        `step` is the scheduler's output when it owns layer 0, else the previous stage's boundary."""
        if self.end != self.num_layers:
            raise ValueError(f"runner of layers [{self.start}, {self.end}) cannot sample: the last "
                             f"layer is {self.num_layers - 1}; use execute_stage")
        out = step.step if isinstance(step, StageBoundary) else step
        if self.constraints is not None:
            self.constraints.free(out.finished_request_ids)
        if not out.seqs and self.start == 0 and not isinstance(step, StageBoundary):
            return RunnerOutput()  # only finished ids to free (the engine going idle)
        seqs, hidden = self._run(step)
        return self._sample(seqs, hidden)

    @torch.inference_mode()
    def execute_stage(self, step: SchedulerOutput | StageBoundary) -> StageBoundary:
        """Run this runner's layers on one step and hand the hidden states to the stage owning `end`."""
        seqs, hidden = self._run(step)
        return StageBoundary(step.step if isinstance(step, StageBoundary) else step, hidden, self.end)

    def _run(self, step: SchedulerOutput | StageBoundary) -> tuple[list[ScheduledSeq], torch.Tensor]:
        """Blocks `[start, end)` on the step's tokens (embedded here when `start == 0`)."""
        if isinstance(step, StageBoundary):
            if step.layer != self.start:
                raise ValueError(f"runner of layers [{self.start}, {self.end}) got hidden states "
                                 f"that end before layer {step.layer}")
            out, hidden = step.step, step.hidden
        elif self.start != 0:
            raise ValueError(f"runner of layers [{self.start}, {self.end}) needs the previous "
                             f"stage's hidden states, not token ids")
        else:
            out, hidden = step, None
        self._copy_blocks(out)
        seqs = batch_order(out.seqs)
        input_ids, positions, meta = self._prepare(seqs)
        if hidden is None:
            hidden = self.model.embed(input_ids)
        hidden = self.model.forward_layers(hidden, positions, meta, self.kv_caches, self.start, self.end)
        return seqs, hidden

    def _copy_blocks(self, out: SchedulerOutput) -> None:
        if not out.copies:
            return
        bs = self.block_size
        src = torch.cat([torch.arange(c.src * bs, (c.src + 1) * bs) for c in out.copies])
        dst = torch.cat([torch.arange(c.dst * bs, (c.dst + 1) * bs) for c in out.copies])
        for k_cache, v_cache in self.kv_caches:
            k_cache[dst] = k_cache[src]
            v_cache[dst] = v_cache[src]

    # -- KV migration (`engine.kv_transfer.KVBlockIO`) ---------------------------------------------
    def read_blocks(self, block_ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, copies of K and V of `block_ids`: `[len(block_ids), block_size, heads, head_size]`."""
        index = torch.tensor(block_ids, dtype=torch.long)
        return [(k.view(-1, self.block_size, *k.shape[1:])[index].clone(),
                 v.view(-1, self.block_size, *v.shape[1:])[index].clone()) for k, v in self.kv_caches]

    def write_blocks(self, block_ids: list[int], blocks: list[tuple[torch.Tensor, torch.Tensor]],
                     rows: list[int]) -> None:
        """Write rows `rows` of a `read_blocks` payload into `block_ids`; ValueError (nothing written) when
        it does not match this cache: layer count, block size, heads, head size or dtype."""
        if not isinstance(blocks, list | tuple) or len(blocks) != len(self.kv_caches):
            count = len(blocks) if isinstance(blocks, list | tuple) else type(blocks).__name__
            raise ValueError(f"blocks: {count} layers, this runner has {len(self.kv_caches)}")
        if len(rows) != len(block_ids):
            raise ValueError(f"rows: {len(rows)} rows for {len(block_ids)} block ids")
        for layer, (pair, cache) in enumerate(zip(blocks, self.kv_caches)):
            for name, got, have in zip("KV", pair, cache, strict=True):
                want = (self.block_size, *have.shape[1:])
                if not isinstance(got, torch.Tensor) or tuple(got.shape[1:]) != want or got.dtype != have.dtype:
                    shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                    dtype = got.dtype if isinstance(got, torch.Tensor) else None
                    raise ValueError(f"blocks[{layer}].{name}: shape {shape} {dtype}, this cache needs "
                                     f"[n, {', '.join(map(str, want))}] {have.dtype}")
                if rows and max(rows) >= got.shape[0]:
                    raise ValueError(f"rows: row {max(rows)} of a payload of {got.shape[0]} blocks")
        index, src = torch.tensor(block_ids, dtype=torch.long), torch.tensor(rows, dtype=torch.long)
        with torch.inference_mode():
            for (k_in, v_in), (k, v) in zip(blocks, self.kv_caches):
                k.view(-1, self.block_size, *k.shape[1:])[index] = k_in[src]
                v.view(-1, self.block_size, *v.shape[1:])[index] = v_in[src]

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
        slot_mapping = torch.tensor(slots, dtype=torch.long)
        if self.batch_invariant:  # one per-query view instead of the attention groups
            meta = AttentionMetadata(query_lens=[s.num_tokens for s in seqs],
                                     seq_lens=[s.start_pos + s.num_tokens for s in seqs],
                                     slot_mapping=slot_mapping, kv_slots=None, q_index=None,
                                     view=invariant_view(seqs, bs))
            return torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long), meta
        num_decode = sum(1 for s in seqs if s.num_tokens == 1)
        groups = []
        if num_decode:
            groups.append(build_group(seqs[:num_decode], bs))
        groups.extend(build_group([s], bs) for s in seqs[num_decode:])
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
        logits = self.model.head(hidden[torch.tensor(rows)])
        for seq, first, count in prompt_rows:
            nexts = list(seq.prompt_token_ids[seq.start_pos + 1:seq.start_pos + 1 + count])
            num_logprobs = seq.spec.params.prompt_logprobs
            assert num_logprobs is not None
            result.prompt_logprobs[seq.request_id] = prompt_logprobs(
                logits[first:first + count], nexts, num_logprobs)
        if sample_seqs:
            sample_logits = logits[len(rows) - len(sample_seqs):]
            masks = self._masks(sample_seqs)
            sampled = self.sampler(sample_logits, [self._row(s, masks.allowed.get(s.request_id))
                                                   for s in sample_seqs])
            for seq, token, lp in zip(sample_seqs, sampled.token_ids, sampled.logprobs):
                error = masks.errors.get(seq.request_id)
                if error is None and seq.request_id in masks.allowed:
                    assert self.constraints is not None
                    error = self.constraints.accept(seq.request_id, token)
                if error is not None:
                    result.errors[seq.request_id] = error
                    continue
                result.sampled[seq.request_id] = token
                if lp is not None:
                    result.logprobs[seq.request_id] = lp
        return result

    def _masks(self, seqs: list[ScheduledSeq]) -> StepMasks:
        """Allowed tokens of the constrained rows, their states synced to the rows' outputs."""
        rows = [(s.request_id, s.spec.params.structured, s.output_token_ids) for s in seqs
                if s.spec.params.structured is not None]
        if not rows:
            return StepMasks()
        if self.constraints is None:
            return StepMasks(errors={rid: "structured output is not available: this runner has no "
                                          "tokenizer for constraints" for rid, _, _ in rows})
        return self.constraints.masks(rows)  # type: ignore[arg-type]

    def _row(self, seq: ScheduledSeq, allowed: torch.Tensor | None = None) -> SamplingRow:
        """The sampler's row for a sequence. A seeded row's generator depends on (seed, position of the
        token it samples) only, so a request resumed from its tokens elsewhere samples the same tokens."""
        spec = seq.spec
        generator = None
        if spec.seed is not None:
            generator = position_generator(spec.seed, len(seq.prompt_token_ids) + len(seq.output_token_ids))
        return SamplingRow(params=spec.params, prompt_token_ids=seq.prompt_token_ids,
                           output_token_ids=seq.output_token_ids, generator=generator,
                           suppress_token_ids=spec.suppress_token_ids, allowed=allowed)


def invariant_view(seqs: list[ScheduledSeq], block_size: int) -> InvariantAttention:
    """Per-query attention layout of a step for batch-invariant mode."""
    positions: list[int] = []
    rows: list[int] = []
    contexts: list[torch.Tensor] = []
    for i, seq in enumerate(seqs):
        end = seq.start_pos + seq.num_tokens
        table = torch.tensor(seq.block_ids[:-(-end // block_size)], dtype=torch.long)
        slots = (table[:, None] * block_size + torch.arange(block_size)).reshape(-1)[:end]
        contexts.append(slots)
        positions.extend(range(seq.start_pos, end))
        rows.extend([i] * seq.num_tokens)
    return InvariantAttention(positions, rows, contexts)
