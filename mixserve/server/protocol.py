"""OpenAI request bodies (pydantic, strict types). Unknown fields are kept in `model_extra`.

Strict mode: `"5"` is not an integer and `true` is not a number, as in the OpenAI API; an integer is
accepted where a number is expected. Ranges are checked by `SamplingParams` so there is one source of
truth for them (its errors name the field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mixserve.sampling_params import SEED_MAX, SEED_MIN


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow", use_attribute_docstrings=True)

    @property
    def unknown_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions (OpenAI names, plus vLLM's common extras)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    """Per-request seed, any integer in [-2**63, 2**64 - 1]: the same seed gives the same tokens."""
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # inference-time scaling (mixserve extension): run a strategy and return its selected answer
    strategy: str | None = None
    """mixserve: run this inference-time scaling strategy (e.g. majority, bon, bom, beam) and answer with
    its selected sample; needs one prompt (stream=true streams progress events, then the answer)."""
    budget: int | None = None
    """mixserve: the strategy's sample budget (1..1024)."""
    verifier: str | None = None
    """mixserve: the verifier a strategy scores samples with."""
    # structured outputs (vLLM's extra fields); at most one constraint per request
    guided_json: dict[str, Any] | str | None = None
    """vLLM: constrain the output to this JSON schema."""
    guided_regex: str | None = None
    """vLLM: constrain the output to this regular expression."""
    guided_choice: list[str] | None = None
    """vLLM: the output is exactly one of these strings."""
    guided_grammar: str | None = None
    """vLLM: constrain the output to this Lark or GBNF grammar."""
    structured_outputs: dict[str, Any] | None = None
    """vLLM: `{"json": schema} | {"regex": ...} | {"choice": [...]} | {"grammar": ...} | {"json_object": true}`."""
    extractor: str | None = None
    """mixserve: how a strategy reads answers from samples: auto, number, boxed, answer_line or choice."""
    reference: str | None = None
    """mixserve: the expected answer for verifier=task (exact match of extracted answers)."""


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant message's calls (OpenAI shape), shown to the model in the history."""
    tool_call_id: str | None = None
    """A tool message: the id of the call it answers."""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
