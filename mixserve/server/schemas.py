"""Response bodies as pydantic models: the source of `/openapi.json`'s response schemas.

The routes build plain dicts (fast, no validation on the hot path); tests validate real responses
against these models, so the served schema is what the server sends. Extra keys are allowed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class _Out(BaseModel):
    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


class ErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    """The request field at fault (`messages.0.content`), or null."""
    code: str | None


class ErrorResponse(_Out):
    """Every non-2xx answer (OpenAI's error shape)."""

    error: ErrorDetail


class PromptTokensDetails(_Out):
    cached_tokens: int
    """Prompt tokens served from the prefix cache."""


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    scaling: dict[str, Any] | None = None
    """mixserve: the compute a strategy spent (policy and verifier tokens), on strategy requests."""


class ScalingCandidate(_Out):
    index: int
    answer: str | None
    score: float | None
    num_tokens: int
    finish_reason: str | None


class ScalingResult(_Out):
    """mixserve: a strategy request's selection (`strategy` field)."""

    strategy: str
    answer: str | None
    selected: list[int]
    candidates: list[ScalingCandidate]
    info: dict[str, Any]


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    """null for the first prompt token under echo (it has no context); -9999.0 stands for -inf."""
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    """mixserve/vLLM: the stop string or token id that ended the choice."""
    error: str | None = None
    """mixserve: why this choice failed, when it did."""


class CompletionResponse(_Out):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    scaling: ScalingResult | None = None


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[TokenLogprob] | None


class ChatMessageOut(_Out):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] = []
    reasoning_content: str | None = None


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    stop_reason: str | int | None = None
    error: str | None = None


class ChatCompletionResponse(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage
    scaling: ScalingResult | None = None


class ModelCard(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int | None
    status: Literal["ready", "loading"]


class ModelList(_Out):
    object: Literal["list"]
    data: list[ModelCard]


class Health(_Out):
    status: Literal["ok"]


class Version(_Out):
    version: str


class TokenizeResponse(_Out):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Out):
    prompt: str


class TokenizerInfo(_Out):
    """vLLM's /tokenizer_info: the tokenizer_config.json view (what lm-eval's remote tokenizer reads)."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    add_bos_token: bool
    add_eos_token: bool
    model_max_length: int
    clean_up_tokenization_spaces: bool
    chat_template: str | None
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
