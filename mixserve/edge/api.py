"""`LLM`-level Python API of both sides: load a checkpoint by name or path, split it, run.

>>> cloud = CloudServer("smollm2-135m", split_layer=15, port=8765); cloud.start()
>>> edge = EdgeLLM("smollm2-135m", cloud_url="ws://127.0.0.1:8765", split_layer=15, exit_threshold=0.8)
>>> edge.generate("The capital of France is", max_tokens=16).text
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixserve.builder import LoadedModel, load_model
from mixserve.config import EngineConfig, ModelConfig
from mixserve.edge.cloud import CloudContextManager, CloudService, CloudStats
from mixserve.edge.codec import Codec
from mixserve.edge.config import DEFAULT_MAX_FRAME_BYTES, CloudConfig, EdgeConfig
from mixserve.edge.edge import EdgeResult, EdgeRunner, EdgeStats, Stopping
from mixserve.edge.exit_adapter import ExitAdapter, FitConfig, default_path, fit_exit_adapter
from mixserve.edge.frames import Frame, FrameKind, decode_frame, model_key, pack_ids, unpack_ids
from mixserve.edge.link import Link, websocket_connector
from mixserve.edge.sampling import GREEDY, for_sample
from mixserve.models.base import as_causal_lm
from mixserve.sampling_params import SamplingParams


def load(model: str, dtype: str = "float32", weight_format: str = "auto", num_threads: int | None = None,
         cache_dir: str | Path | None = None) -> LoadedModel:
    """The whole checkpoint (each side then runs only its layers)."""
    config = EngineConfig(model=ModelConfig(model=model, dtype=dtype, weight_format=weight_format,  # type: ignore[arg-type]
                                            num_threads=num_threads))
    return load_model(config, cache_dir=cache_dir)


@dataclass
class EdgeOutput:
    """A generated sequence with its text and where each token was decided."""

    text: str
    result: EdgeResult


class EdgeLLM:
    """The edge: layers `[0, K)` + exit head; `cloud_url=None` runs standalone (edge-only)."""

    def __init__(self, model: str, cloud_url: str | None, split_layer: int, exit_threshold: float = 0.8,
                 codec: str = "fp16", cloud_timeout_s: float = 5.0, retry_interval_s: float = 2.0,
                 naive: bool = False, max_len: int = 2048, exit_adapter: str | Path | None = None,
                 loaded: LoadedModel | None = None, connect: Callable[[], Link] | None = None,
                 **load_kw: Any) -> None:
        self.loaded = loaded if loaded is not None else load(model, **load_kw)
        self.tokenizer = self.loaded.checkpoint.tokenizer
        self.config = EdgeConfig(split_layer=split_layer, exit_threshold=exit_threshold, codec=Codec.parse(codec),
                                 cloud_timeout_s=cloud_timeout_s, retry_interval_s=retry_interval_s,
                                 naive=naive, max_len=max_len)
        lm, hf_config = as_causal_lm(self.loaded.model), self.loaded.checkpoint.hf_config
        head = None if exit_adapter is None else ExitAdapter.load(exit_adapter, lm, hf_config, split_layer)
        if connect is None and cloud_url is not None:
            connect = websocket_connector(cloud_url, cloud_timeout_s)
        self.runner = EdgeRunner(lm, hf_config, self.config, connect,
                                 self.loaded.dtype, tuple(self.tokenizer.eos_token_ids), exit_head=head)

    @property
    def stats(self) -> EdgeStats:
        return self.runner.stats

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        if chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def generate(self, prompt: str | list[int], max_tokens: int = 64, ignore_eos: bool = False,
                 chat: bool = False, on_token: Any = None, params: SamplingParams | None = None) -> EdgeOutput:
        """Greedy, or sampled as `params` say (temperature, top-p/k, min-p, penalties, logit bias, seed,
        min_tokens, stop token ids; stop strings and n > 1 are the server's, see `EdgeEngine`)."""
        ids = self.encode(prompt, chat)
        sampling, stopping = GREEDY, Stopping(ignore_eos)
        if params is not None:
            sampling = for_sample(params, len(ids), params.seed)
            stopping = Stopping(ignore_eos or params.ignore_eos, params.min_tokens, params.stop_token_ids)
        result = self.runner.generate(ids, max_tokens, on_token=on_token, sampling=sampling, stopping=stopping,
                                      on_step=None if params is None or not params.stop_token_ids else
                                      lambda token, _source, _entry: token in params.stop_token_ids)
        detok = self.tokenizer.detokenizer(ids)  # text as a stream shows it (prompt context, e.g. spaces)
        return EdgeOutput(detok.push_many(result.token_ids) + detok.flush(), result)

    def close(self) -> None:
        self.runner.close()


class CloudServer:
    """The cloud: layers `[K, L)` + final head behind a WebSocket endpoint on `host:port` (0: any free port)."""

    def __init__(self, model: str, split_layer: int, host: str = "127.0.0.1", port: int = 0,
                 session_ttl_s: float = 600.0, memory_budget_bytes: int = 1 << 30,
                 loaded: LoadedModel | None = None, **load_kw: Any) -> None:
        from mixserve.edge.link import make_cloud_server

        self.loaded = loaded if loaded is not None else load(model, **load_kw)
        hf_config = self.loaded.checkpoint.hf_config
        self.config = CloudConfig(split_layer=split_layer, session_ttl_s=session_ttl_s,
                                  memory_budget_bytes=memory_budget_bytes)
        manager = CloudContextManager(as_causal_lm(self.loaded.model), self.config, self.loaded.dtype)
        self.service = CloudService(manager, model_key(hf_config, split_layer), int(hf_config["hidden_size"]),
                                    tuple(self.loaded.checkpoint.tokenizer.eos_token_ids))
        self.server = make_cloud_server(self.service, host, port)
        self.host, self.port = self.server.socket.getsockname()[:2]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def stats(self) -> CloudStats:
        return self.service.manager.stats

    def serve_forever(self) -> None:
        self.server.serve_forever()

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="edge-cloud")
        self._thread.start()

    def shutdown(self) -> None:
        self.server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class CloudClient:
    """Direct requests to a cloud endpoint: its counters (STATS) and, when it holds the whole model
    (split layer 0), the cloud-only baseline (GENERATE: the prompt goes up once, the tokens come back)."""

    def __init__(self, url: str, key: int, timeout_s: float = 120.0) -> None:
        from mixserve.edge.link import WebSocketLink

        self.link = WebSocketLink(url, timeout_s)
        self.key = key
        self.timeout_s = timeout_s
        self.sid = bytes(16)

    def _ask(self, frame: Frame, want: FrameKind) -> Frame:
        self.link.send(frame.encode())
        while (data := self.link.recv(self.timeout_s)) is not None:
            reply = decode_frame(data, DEFAULT_MAX_FRAME_BYTES)
            if reply.kind is FrameKind.ERROR:
                raise RuntimeError(f"cloud refused {frame.kind.name}: {reply.payload.decode(errors='replace')}")
            if reply.kind is want:
                return reply
        raise TimeoutError(f"no {want.name} from the cloud within {self.timeout_s}s")

    def stats(self) -> dict[str, Any]:
        return dict(json.loads(self._ask(Frame(FrameKind.STATS, self.sid, self.key), FrameKind.STATS).payload))

    def generate(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        frame = Frame(FrameKind.GENERATE, self.sid, self.key, count=max_tokens, payload=pack_ids(prompt_ids))
        return unpack_ids(self._ask(frame, FrameKind.TOKENS).payload)

    def close(self) -> None:
        self.link.close()


def fit_prompts(tokenizer: Any, num_per_task: int, seed: int = 1000) -> list[list[int]]:
    """Chat prompts from every task of the suite (difficulty 1-3, a seed the benchmarks do not use)."""
    from mixserve.scaling.tasks import TASKS

    prompts = []
    for task in TASKS.values():
        for difficulty in (1, 2, 3):
            for problem in task.generate(num_per_task, seed=seed, difficulty=difficulty):
                prompts.append(tokenizer.encode_chat([{"role": "user", "content": problem.question}]))
    return prompts


def fit_exit(model: str, split_layer: int, num_per_task: int = 2, config: FitConfig | None = None,
             out: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
             **load_kw: Any) -> tuple[Path, ExitAdapter]:
    """Fit an exit adapter for layer `split_layer` of `model` and save it beside the model."""
    loaded = load(model, **load_kw)
    prompts = fit_prompts(loaded.checkpoint.tokenizer, num_per_task)
    adapter = fit_exit_adapter(as_causal_lm(loaded.model), loaded.checkpoint.hf_config, split_layer, prompts,
                               config or FitConfig(), progress)
    path = Path(out) if out is not None else default_path(loaded.checkpoint.path, split_layer)
    adapter.save(path)
    return path, adapter
