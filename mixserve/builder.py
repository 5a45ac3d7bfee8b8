"""Checkpoint -> model -> runner -> engine, in one place (used by LLM, the CLI and the server)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mixserve.config import ConfigError, EngineConfig
from mixserve.engine.engine import Engine, ModelInfo
from mixserve.experts.budgeted import BudgetedExpertProvider
from mixserve.experts.setup import build_from_pack, pack_tokenizer, prepare_pack
from mixserve.hub import default_cache_dir, resolve_model
from mixserve.layers.invariant import set_batch_invariant
from mixserve.layers.linear import quantize_linears
from mixserve.layers.quant import QuantMode
from mixserve.loading.checkpoint import Checkpoint, load_checkpoint
from mixserve.loading.tokenizer import Tokenizer
from mixserve.models.base import as_causal_lm, build_model
from mixserve.runner.model_runner import TorchModelRunner, kv_bytes_per_block
from mixserve.structured.constraints import Constraints

DEFAULT_MAX_MODEL_LEN = 8192
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class BuiltEngine:
    engine: Engine
    tokenizer: Tokenizer
    checkpoint: Checkpoint
    model: torch.nn.Module
    runner: TorchModelRunner
    load_seconds: float


@dataclass
class LoadedModel:
    """A checkpoint turned into a ready module; several engines may share it."""

    checkpoint: Checkpoint
    model: torch.nn.Module
    dtype: torch.dtype
    weight_format: str
    load_seconds: float
    expert_provider: BudgetedExpertProvider | None = None
    """The budgeted expert cache when `ExpertConfig.memory_budget` is set (None: experts all resident)."""
    quantized: dict[str, int] = field(default_factory=dict)
    """How many Linears run each quantized format ("int4", "int8"); empty for dense weights."""

    def expert_stats(self) -> dict[str, float]:
        """Expert cache counters (hit rate, bytes read per token, prefetch recall, stall seconds, ...);
        empty when experts are all resident."""
        return {} if self.expert_provider is None else self.expert_provider.expert_stats()


def load_model(config: EngineConfig, cache_dir: str | Path | None = None) -> LoadedModel:
    """Resolve, read and build the model of `config.model`; errors name the file or field at fault."""
    start = time.perf_counter()
    mc = config.model
    if mc.num_threads is not None:
        torch.set_num_threads(mc.num_threads)
    dtype = _DTYPES[mc.dtype]
    model, checkpoint, provider = _load_weights(config, cache_dir, dtype)
    model.eval()
    weight_format: str = mc.weight_format
    modes: dict[str, QuantMode] = {"int8": "int8", "int4": "int4"}
    mode = modes.get(mc.weight_format)
    if mc.weight_format == "auto" and checkpoint.format == "gguf":
        weight_format, mode = "native", "native"  # the file's own 4-bit tensors as int4, the rest int8
    elif mc.weight_format == "auto":
        weight_format = "dense"
    counts = {} if mode is None else quantize_linears(model, mode)
    return LoadedModel(checkpoint, model, dtype, weight_format, time.perf_counter() - start, provider,
                       counts)


def _load_weights(config: EngineConfig, cache_dir: str | Path | None, dtype: torch.dtype
                  ) -> tuple[torch.nn.Module, Checkpoint, BudgetedExpertProvider | None]:
    """The model with its weights; experts from an expert pack (budgeted or all resident) when the
    model is a pack or `config.experts.memory_budget` is set (an MoE folder is packed on first use)."""
    path = resolve_model(config.model.model, cache_dir=cache_dir)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pack = prepare_pack(path, config.experts, cache)
    if pack is None:
        checkpoint = load_checkpoint(path)
        model = build_model(checkpoint.hf_config, dtype)
        as_causal_lm(model).load_weights(checkpoint.weights())
        return model, checkpoint, None
    checkpoint = load_checkpoint(pack, tokenizer_path=pack_tokenizer(pack))
    model, provider = build_from_pack(checkpoint.hf_config, pack, config.experts, dtype)
    as_causal_lm(model).load_weights(checkpoint.weights())
    return model, checkpoint, provider


def wire_engine(loaded: LoadedModel, config: EngineConfig, seed: int = 0) -> BuiltEngine:
    """KV cache, runner and engine for an already loaded model."""
    checkpoint, model, dtype = loaded.checkpoint, loaded.model, loaded.dtype
    max_len = _max_model_len(config, checkpoint.hf_config)
    lm = as_causal_lm(model)
    cache = config.cache
    num_blocks = cache.num_blocks or cache.kv_cache_bytes // kv_bytes_per_block(
        lm.kv_cache_spec(), cache.block_size, dtype)
    needed = -(-max_len // cache.block_size)
    if num_blocks < needed:
        raise ConfigError(f"invalid config kv cache: {num_blocks} blocks of {cache.block_size} tokens "
                          f"cannot hold one sequence of max_model_len={max_len}; raise kv_cache_bytes "
                          f"or lower max_model_len")
    eos = tuple(checkpoint.tokenizer.eos_token_ids)
    vocab_size = int(checkpoint.hf_config["vocab_size"])
    constraints = Constraints(checkpoint.tokenizer.backend.to_str, vocab_size, eos)
    set_batch_invariant(model, config.model.batch_invariant)
    runner = TorchModelRunner(lm, num_blocks, cache.block_size, dtype, eos, seed=seed, constraints=constraints,
                              batch_invariant=config.model.batch_invariant)
    info = ModelInfo(max_model_len=max_len, vocab_size=vocab_size,
                     eos_token_ids=eos, num_blocks=num_blocks)
    engine = Engine(config, runner, checkpoint.tokenizer, info)
    return BuiltEngine(engine, checkpoint.tokenizer, checkpoint, model, runner, loaded.load_seconds)


def build_engine(config: EngineConfig, cache_dir: str | Path | None = None, seed: int = 0) -> BuiltEngine:
    """Load the model of `config` and wire an engine around it."""
    return wire_engine(load_model(config, cache_dir), config, seed)


def _max_model_len(config: EngineConfig, hf_config: dict) -> int:
    native = int(hf_config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    requested = config.model.max_model_len
    if requested is None:
        return min(native, DEFAULT_MAX_MODEL_LEN)
    if requested > native:
        raise ConfigError(f"invalid config max_model_len={requested}: the model supports {native}")
    return requested
