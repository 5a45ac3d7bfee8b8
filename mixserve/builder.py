"""Checkpoint -> model -> runner -> engine, in one place (used by LLM, the CLI and the server)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mixserve.config import ConfigError, EngineConfig
from mixserve.engine.engine import Engine, ModelInfo
from mixserve.hub import resolve_model
from mixserve.layers.linear import enable_int8
from mixserve.loading.checkpoint import Checkpoint, load_checkpoint
from mixserve.loading.tokenizer import Tokenizer
from mixserve.models.base import build_model
from mixserve.runner.model_runner import TorchModelRunner, kv_bytes_per_block

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


def build_engine(config: EngineConfig, cache_dir: str | Path | None = None, seed: int = 0) -> BuiltEngine:
    """Resolve, load and wire everything for `config`; errors name the file or field at fault."""
    start = time.perf_counter()
    mc = config.model
    if mc.num_threads is not None:
        torch.set_num_threads(mc.num_threads)
    path = resolve_model(mc.model, cache_dir=cache_dir)
    checkpoint = load_checkpoint(path)
    dtype = _DTYPES[mc.dtype]
    model = build_model(checkpoint.hf_config, dtype)
    model.load_weights(checkpoint.weights())
    model.eval()
    weight_format = mc.weight_format
    if weight_format == "auto":
        weight_format = "int8" if checkpoint.format == "gguf" else "dense"
    if weight_format == "int8":
        enable_int8(model)
    max_len = _max_model_len(config, checkpoint.hf_config)
    shapes = model.kv_cache_shapes()  # type: ignore[operator]
    cache = config.cache
    num_blocks = cache.num_blocks or cache.kv_cache_bytes // kv_bytes_per_block(shapes, cache.block_size, dtype)
    needed = -(-max_len // cache.block_size)
    if num_blocks < needed:
        raise ConfigError(f"invalid config kv cache: {num_blocks} blocks of {cache.block_size} tokens "
                          f"cannot hold one sequence of max_model_len={max_len}; raise kv_cache_bytes "
                          f"or lower max_model_len")
    runner = TorchModelRunner(model, num_blocks, cache.block_size, dtype,
                              tuple(checkpoint.tokenizer.eos_token_ids), seed=seed)
    info = ModelInfo(max_model_len=max_len, vocab_size=int(checkpoint.hf_config["vocab_size"]),
                     eos_token_ids=tuple(checkpoint.tokenizer.eos_token_ids), num_blocks=num_blocks)
    engine = Engine(config, runner, checkpoint.tokenizer, info)
    return BuiltEngine(engine, checkpoint.tokenizer, checkpoint, model, runner,
                       time.perf_counter() - start)


def _max_model_len(config: EngineConfig, hf_config: dict) -> int:
    native = int(hf_config.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)
    requested = config.model.max_model_len
    if requested is None:
        return min(native, DEFAULT_MAX_MODEL_LEN)
    if requested > native:
        raise ConfigError(f"invalid config max_model_len={requested}: the model supports {native}")
    return requested
