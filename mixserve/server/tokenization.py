"""POST /tokenize, POST /detokenize and GET /tokenizer_info, in vLLM's shapes (what eval harnesses call).

lm-eval-harness's remote tokenizer (`tokenizer_backend=remote`) reads `eos_token`, `bos_token`,
`pad_token` and `chat_template` from /tokenizer_info, encodes with `/tokenize` (`add_special_tokens:
false`) and decodes with `/detokenize`. Tokenization runs off the event loop.
"""

from __future__ import annotations

from typing import Any

from mixserve.server.errors import ApiError
from mixserve.server.guards import offload
from mixserve.server.params import chat_prompt
from mixserve.server.protocol import ChatCompletionRequest, DetokenizeRequest, TokenizeRequest
from mixserve.server.serving import ServerState


async def tokenize(state: ServerState, body: TokenizeRequest) -> dict[str, Any]:
    state.ready()
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "exactly one of prompt and messages is required", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise ApiError(400, "invalid field messages: must not be empty", param="messages")
        chat = ChatCompletionRequest(messages=body.messages, add_generation_prompt=body.add_generation_prompt)
        ids = (await offload(chat_prompt, chat, state.tokenizer)).token_ids
    else:
        ids = await offload(state.tokenizer.encode, body.prompt, add_special_tokens=body.add_special_tokens)
    assert state.limits is not None
    return {"tokens": ids, "count": len(ids), "max_model_len": state.limits.max_model_len}


async def detokenize(state: ServerState, body: DetokenizeRequest) -> dict[str, Any]:
    state.ready()
    assert state.limits is not None
    vocab_size = state.limits.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab_size]
    if bad:
        raise ApiError(400, f"invalid field tokens: token id {bad[0]} is outside the vocabulary "
                       f"[0, {vocab_size})", param="tokens")
    return {"prompt": await offload(state.tokenizer.decode, body.tokens, skip_special_tokens=False)}


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """What vLLM's /tokenizer_info serves: the tokenizer_config.json view of the served tokenizer."""
    state.ready()
    tok = state.tokenizer
    assert state.limits is not None
    special = tok.special_tokens()
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(tok.add_bos_token),
        "add_eos_token": False,
        "model_max_length": state.limits.max_model_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": tok.chat_template,
        "vocab_size": state.limits.vocab_size,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "unk_token_id": tok.unk_token_id,
    }
