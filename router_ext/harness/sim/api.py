"""OpenAI-compatible request parsing and response encoding, shaped like vLLM's server.

Clients, Envoy and the router's tests see the same JSON a real vLLM returns: the same objects
(`chat.completion`, `chat.completion.chunk`, `text_completion`), `usage`, SSE framing with a
final `data: [DONE]`, and errors as `{"error": {"message", "type", "param", "code"}}`.
Streaming chunks are assembled from pre-encoded byte pieces so a token costs one bytes join.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

MAX_TOKENS_CAP = 4096
DEFAULT_MAX_TOKENS = 16
MAX_MODEL_LEN = 8192

# A small fixed vocabulary: output is deterministic and every token is one "word".
_WORDS = (
    "the quick brown fox jumps over a lazy dog while simulated engines stream tokens to every "
    "client that asks politely and the router picks which pod serves each request from queue "
    "length cache usage and latency so nobody waits too long today"
)
VOCAB = tuple(" " + w for w in _WORDS.split())
_VOCAB_JSON = tuple(json.dumps(w).encode() for w in VOCAB)
DONE_EVENT = b"data: [DONE]\n\n"
_dumps = functools.partial(json.dumps, separators=(",", ":"))  # compact, like pydantic


class ApiError(Exception):
    """An error answered to the client with an OpenAI-style body."""

    def __init__(self, status: int, message: str, err_type: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


def error_body(status: int, message: str, err_type: str, param: str | None = None) -> bytes:
    """vLLM's `ErrorResponse(error=ErrorInfo(message, type, param, code))`, field order kept."""
    return _dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": status}}
    ).encode()


def model_not_found(model: object) -> ApiError:
    """What vLLM's `_check_model` answers for a model it does not serve (base or adapter)."""
    return ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model")


def bad_request(message: str) -> ApiError:
    return ApiError(400, message, "BadRequestError")


@dataclass(slots=True)
class ParsedRequest:
    chat: bool
    model: str  # echoed in responses: the adapter's name for an adapter request, as vLLM does
    adapter: str | None
    prompt_text: str
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    min_tokens: int


def estimate_tokens(text: str) -> int:
    """~4 characters per token, the usual rule of thumb for English BPE vocabularies."""
    return max(1, (len(text) + 3) // 4)


def _chat_prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list")
    parts: list[str] = []
    for m in messages:
        if not isinstance(m, dict):
            raise bad_request("each message must be an object")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            text = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        elif content is None or isinstance(content, str):
            text = content or ""
        else:
            raise bad_request("message 'content' must be a string or a list of parts")
        parts.append(f"{m.get('role', 'user')}: {text}\n")
    return "".join(parts)


def _completion_prompt(body: dict[str, Any]) -> tuple[str, int]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt, estimate_tokens(prompt)
    if isinstance(prompt, list) and prompt:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in prompt):
            return " ".join(map(str, prompt)), len(prompt)  # token ids
        if all(isinstance(x, str) for x in prompt):
            text = "".join(prompt)
            return text, estimate_tokens(text)
    raise bad_request("'prompt' must be a string, a list of strings or a list of token ids")


def _int_field(body: dict[str, Any], key: str, default: int) -> int:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool):
        raise bad_request(f"'{key}' must be an integer")
    return v


def parse_request(
    body: Any, chat: bool, served_model: str, adapters: frozenset[str] = frozenset()
) -> ParsedRequest:
    """Validate a request body the way vLLM does; raise ApiError with vLLM's status codes.

    `model` absent or empty means the base model (vLLM's `_is_model_supported`); an adapter
    name runs with that adapter; anything else is a 404.
    """
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    model = body.get("model")
    adapter: str | None = None
    if model is None or model == "" or model == served_model:
        model = served_model
    elif isinstance(model, str) and model in adapters:
        adapter = model
    else:
        raise model_not_found(model)
    if chat:
        text = _chat_prompt(body)
        prompt_tokens = estimate_tokens(text)
    else:
        text, prompt_tokens = _completion_prompt(body)
    key = "max_completion_tokens" if chat and body.get("max_completion_tokens") else "max_tokens"
    max_tokens = _int_field(body, key, DEFAULT_MAX_TOKENS)
    if max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.")
    max_tokens = min(max_tokens, MAX_TOKENS_CAP)
    if prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise bad_request(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
            f"{max_tokens} in the completion). Please reduce the length of the messages or "
            "completion."
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean")
    opts = body.get("stream_options")
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    min_tokens = min(max(0, _int_field(body, "min_tokens", 0)), max_tokens)
    return ParsedRequest(
        chat=chat,
        model=model,
        adapter=adapter,
        prompt_text=text,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=include_usage,
        ignore_eos=bool(body.get("ignore_eos", False)),
        min_tokens=min_tokens,
    )


def output_text(seq: int, n: int) -> str:
    v = len(VOCAB)
    return "".join(VOCAB[(seq + i) % v] for i in range(n))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def full_response(
    p: ParsedRequest, req_id: str, created: int, seq: int, n: int, finish_reason: str
) -> bytes:
    text = output_text(seq, n)
    choice: dict[str, Any]
    if p.chat:
        obj = "chat.completion"
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    else:
        obj = "text_completion"
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    return _dumps(
        {
            "id": req_id,
            "object": obj,
            "created": created,
            "model": p.model,
            "choices": [choice],
            "usage": _usage(p.prompt_tokens, n),
        }
    ).encode()


class StreamEncoder:
    """Builds SSE chunks for one streaming request from pre-encoded pieces."""

    __slots__ = ("_created", "_head", "_mid", "_p", "_req_id", "_role", "_seq", "_tail")

    def __init__(self, p: ParsedRequest, req_id: str, created: int, seq: int) -> None:
        self._p = p
        self._req_id = req_id
        self._created = created
        self._seq = seq
        obj = "chat.completion.chunk" if p.chat else "text_completion"
        head = (
            f'data: {{"id":{json.dumps(req_id)},"object":"{obj}","created":{created},'
            f'"model":{json.dumps(p.model)},"choices":[{{"index":0,'
        ).encode()
        if p.chat:
            self._head = head + b'"delta":{"content":'
            self._mid = b'},"logprobs":null,"finish_reason":'
            self._role = head + (
                b'"delta":{"role":"assistant","content":""},"logprobs":null,'
                b'"finish_reason":null}]}\n\n'
            )
        else:
            self._head = head + b'"text":'
            self._mid = b',"logprobs":null,"finish_reason":'
            self._role = b""
        self._tail = b',"stop_reason":null}]}\n\n'

    def tokens(self, start: int, end: int, finish_reason: str | None) -> bytes:
        """Chunks for tokens [start, end); the last one carries finish_reason if given."""
        v = len(_VOCAB_JSON)
        out = [self._role] if start == 0 else []
        head, mid, tail = self._head, self._mid, self._tail
        for i in range(start, end):
            fr = b"null"
            if finish_reason is not None and i == end - 1:
                fr = json.dumps(finish_reason).encode()
            out.append(head + _VOCAB_JSON[(self._seq + i) % v] + mid + fr + tail)
        return b"".join(out)

    def finish_only(self, finish_reason: str) -> bytes:
        empty = b'""'
        return self._head + empty + self._mid + json.dumps(finish_reason).encode() + self._tail

    def usage(self, completion_tokens: int) -> bytes:
        obj = "chat.completion.chunk" if self._p.chat else "text_completion"
        body = {
            "id": self._req_id,
            "object": obj,
            "created": self._created,
            "model": self._p.model,
            "choices": [],
            "usage": _usage(self._p.prompt_tokens, completion_tokens),
        }
        return b"data: " + _dumps(body).encode() + b"\n\n"
