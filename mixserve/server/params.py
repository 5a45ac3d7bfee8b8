"""Request bodies -> engine inputs: prompts as token ids, and one `SamplingParams` per request.

Every rejection is an `ApiError` (400 unless stated) naming the field and the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mixserve.sampling_params import SamplingParams
from mixserve.server.errors import ApiError, as_api_error
from mixserve.server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, _Sampling
from mixserve.server.structured import ToolPlan, request_structured
from mixserve.structured.spec import StructuredOutput
from mixserve.structured.tools import template_knows_tools, tool_messages_as_text


@dataclass(frozen=True)
class Limits:
    """What the served model and engine allow."""

    max_model_len: int
    vocab_size: int
    max_num_seqs: int


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    text: str | None


def completion_prompts(body: CompletionRequest, tokenizer: Any, limits: Limits | None = None) -> list[Prompt]:
    """`prompt` as a string, a list of strings, a token list or a list of token lists.

    With `limits`, the number of prompts x n is checked before anything is tokenized.
    """
    p = body.prompt
    if isinstance(p, str):
        items: list[str | list[int]] = [p]
    elif p and all(isinstance(x, int) for x in p):
        items = [p]  # type: ignore[list-item]
    else:
        items = list(p)  # type: ignore[arg-type]
    if not items:
        raise ApiError(400, "invalid field prompt: must not be empty", param="prompt")
    if limits is not None:
        _check_num_seqs(body, len(items), limits)
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise ApiError(400, "invalid field prompt: a prompt string is empty", param="prompt")
            prompts.append(Prompt(tokenizer.encode(item), item))
        else:
            if not item:
                raise ApiError(400, "invalid field prompt: a token list is empty", param="prompt")
            prompts.append(Prompt(list(item), None))
    return prompts


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; content parts are joined, images rejected."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"invalid field messages.{i}.content: only text parts are supported "
                                   f"(got type {part.get('type')!r})", param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls is not None:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def chat_prompt(body: ChatCompletionRequest, tokenizer: Any, plan: ToolPlan | None = None) -> Prompt:
    messages = chat_messages(body.messages)
    kwargs = dict(body.chat_template_kwargs or {})
    if plan is not None and plan.active and template_knows_tools(tokenizer.chat_template):
        kwargs["tools"] = body.tools
    elif any("tool_calls" in m or m["role"] == "tool" for m in messages) or (plan is not None and plan.active):
        messages = tool_messages_as_text(messages, plan.tools if plan is not None and plan.active else [])
    add_generation_prompt = body.add_generation_prompt and not body.continue_final_message
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a template error is the caller's messages' fault
        raise ApiError(400, f"invalid field messages: the chat template failed: {exc}", param="messages") from exc
    if body.continue_final_message:
        final = messages[-1]["content"]
        cut = text.rfind(final)
        if messages[-1]["role"] != "assistant" or cut < 0:
            raise ApiError(400, "invalid field continue_final_message: the last message must be a non-empty "
                           "assistant message", param="continue_final_message")
        text = text[:cut + len(final)]
    return Prompt(tokenizer.encode(text, add_special_tokens=False), text)


def sampling_params(body: _Sampling, *, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None, limits: Limits, num_prompts: int,
                    longest_prompt: int, structured: StructuredOutput | None = None) -> SamplingParams:
    """SamplingParams for every prompt of the request; ranges are checked by SamplingParams itself."""
    bias = _logit_bias(body.logit_bias, limits.vocab_size)
    _check_num_seqs(body, num_prompts, limits)
    room = limits.max_model_len - longest_prompt
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"invalid field max_tokens: the context length is {limits.max_model_len} tokens; "
                       f"the prompt has {longest_prompt} and max_tokens={max_tokens} asks for more than the "
                       f"{max(room, 0)} left", param="max_tokens")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=None if body.top_k in (None, -1, 0) or (body.top_k or 0) >= limits.vocab_size else body.top_k,
            min_p=body.min_p or 0.0, seed=body.seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=stop, stop_token_ids=tuple(body.stop_token_ids or ()),
            presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output, logit_bias=bias, structured=structured)
    except Exception as exc:  # noqa: BLE001 - SamplingError names the field
        raise as_api_error(exc) from exc


def _check_num_seqs(body: _Sampling, num_prompts: int, limits: Limits) -> None:
    if body.n * num_prompts > limits.max_num_seqs:
        raise ApiError(400, f"invalid field n: n={body.n} x {num_prompts} prompt(s) exceeds the server's "
                       f"max_num_seqs={limits.max_num_seqs}", param="n")


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"token id as a string": bias}` -> pairs; ids must be in the vocabulary."""
    pairs = []
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise ApiError(400, f"invalid field logit_bias: key {key!r} is not a token id in [0, {vocab_size})",
                           param="logit_bias")
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def check_token_ids(prompts: list[Prompt], limits: Limits) -> None:
    for prompt in prompts:
        bad = [t for t in prompt.token_ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise ApiError(400, f"invalid field prompt: token id {bad[0]} is outside the vocabulary "
                           f"[0, {limits.vocab_size})", param="prompt")
        if len(prompt.token_ids) >= limits.max_model_len:
            raise ApiError(400, f"invalid field prompt: the prompt has {len(prompt.token_ids)} tokens; the "
                           f"context length is {limits.max_model_len}", param="prompt",
                           code="context_length_exceeded")


def completion_params(body: CompletionRequest, prompts: list[Prompt], limits: Limits) -> tuple[SamplingParams, bool]:
    """SamplingParams for /v1/completions and whether the generated token must be dropped (echo, max_tokens=0)."""
    if body.suffix:
        raise ApiError(400, "invalid field suffix: not supported", param="suffix")
    if body.best_of not in (None, 1, body.n):
        raise ApiError(400, f"invalid field best_of: {body.best_of} is not supported (only null, 1 or n)",
                       param="best_of")
    if body.max_tokens is not None and body.max_tokens < 0:
        raise ApiError(400, f"invalid field max_tokens: must be >= 0 (got {body.max_tokens})", param="max_tokens")
    score_only = body.max_tokens == 0
    if score_only and not body.echo:
        raise ApiError(400, "invalid field max_tokens: 0 is only allowed with echo=true (prompt scoring)",
                       param="max_tokens")
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise ApiError(400, f"invalid field logprobs: must be in [0, 20] (got {body.logprobs})", param="logprobs")
    check_token_ids(prompts, limits)
    longest = max(len(p.token_ids) for p in prompts)
    max_tokens = 1 if score_only else body.max_tokens
    if max_tokens is None:
        max_tokens = limits.max_model_len - longest
    echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    params = sampling_params(body, max_tokens=max_tokens, logprobs=body.logprobs, prompt_logprobs=echo_logprobs,
                             limits=limits, num_prompts=len(prompts), longest_prompt=longest,
                             structured=request_structured(body))
    return params, score_only


def chat_params(body: ChatCompletionRequest, prompt: Prompt, limits: Limits,
                plan: ToolPlan | None = None) -> SamplingParams:
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"invalid field {name}: must be >= 1 (got {max_tokens})", param=name)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "invalid field top_logprobs: requires logprobs=true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise ApiError(400, f"invalid field top_logprobs: must be in [0, 20] (got {body.top_logprobs})",
                       param="top_logprobs")
    check_token_ids([prompt], limits)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return sampling_params(body, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None, limits=limits,
                           num_prompts=1, longest_prompt=len(prompt.token_ids),
                           structured=request_structured(body, plan))
