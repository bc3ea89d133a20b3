"""What a request body says that routing may use: the model, the prompt's prefix, a few limits.

Read only for profiles with a body-reading plugin (the prefix scorer), only for completion
paths and bodies under `routing.max_body_bytes`: everything else is routed from headers.

The prompt is reduced to canonical text, so two requests that mean the same prefix hash the same
whatever their JSON spelling (key order, whitespace, `content` as a string or as text parts):

    chat         role "\\x1e" text "\\x1f" per message, text parts joined in order
    completions  the prompt string (a list of strings: joined by "\\x1f"; token ids: their
                 decimal spelling, so token prompts still share prefixes among themselves)

That text (as UTF-8) is cut into `block_chars`-byte blocks and hashed as a chain (xxh3-64,
each block seeded by the previous block's hash, the first by the model name): block i's hash
names the whole prefix up to and including block i, as vLLM's block hashes do. Like llm-d's
approximate prefix scorer this needs no tokenizer; ~4 characters are one token, so 256-byte
blocks are ~64 tokens. At most `max_blocks` are hashed, so a huge prompt costs the same as a
long one. Parsing is bounded by the body cap (orjson: ~50 µs at 128 KB, ~0.45 ms at 1 MiB on
this machine).
"""

from __future__ import annotations

import array
import base64
import binascii
import enum
import sys
from dataclasses import dataclass

import orjson
import xxhash

_xxh = xxhash.xxh3_64_intdigest


class BodySkip(enum.Enum):
    """Why a body gave no prompt facts: the request is routed header-only and counted."""

    NOT_JSON = "not_json"  # includes invalid UTF-8 (JSON must be UTF-8)
    NOT_OBJECT = "not_object"
    BAD_MESSAGES = "bad_messages"  # `messages` / `prompt` missing or of the wrong type
    EMPTY_PROMPT = "empty_prompt"


@dataclass(frozen=True, slots=True)
class PromptFacts:
    model: str | None
    prompt_chars: int  # canonical text length, before the block cap
    hashes: tuple[int, ...]  # chained block hashes, first block first
    max_tokens: int | None
    stream: bool


def canonical_prompt(body: dict[str, object], limit: int) -> str | BodySkip:
    """Canonical prompt text (see the module docstring), at most `limit` characters."""
    messages = body.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not messages:
            return BodySkip.BAD_MESSAGES
        parts: list[str] = []
        size = 0
        for m in messages:
            if not isinstance(m, dict):
                return BodySkip.BAD_MESSAGES
            role = m.get("role")
            content = m.get("content")
            if not isinstance(role, str):
                return BodySkip.BAD_MESSAGES
            parts.append(role)
            parts.append("\x1e")
            if isinstance(content, str):
                parts.append(content)
                size += len(content)
            elif isinstance(content, list):
                for c in content:
                    if isinstance(c, dict) and c.get("type") == "text":
                        t = c.get("text")
                        if not isinstance(t, str):
                            return BodySkip.BAD_MESSAGES
                        parts.append(t)
                        size += len(t)
                    elif isinstance(c, dict) and isinstance(c.get("type"), str):
                        # An image or audio part: it breaks text identity from here on, but
                        # the prefix before it still counts.
                        parts.append(f"\x1d{c['type']}\x1d")
                    else:
                        return BodySkip.BAD_MESSAGES
            elif content is not None:  # assistant tool calls have content null
                return BodySkip.BAD_MESSAGES
            parts.append("\x1f")
            size += len(role) + 2
            if size >= limit:
                break
        return "".join(parts)[:limit]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt[:limit]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\x1f".join(prompt)[:limit]  # type: ignore[arg-type]
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return " ".join(map(str, prompt[: limit // 2]))[:limit]
    return BodySkip.BAD_MESSAGES


def block_hashes(text: str, namespace: str, block_chars: int, max_blocks: int) -> tuple[int, ...]:
    """Chained hashes of the full `block_chars` blocks of `text` (a partial last block is not
    hashed: an engine caches whole blocks only)."""
    h = _xxh(namespace.encode())
    # Blocks of the UTF-8 bytes, encoded once (slicing bytes is ~3x cheaper than encoding
    # each character block); for ASCII text the same blocks as characters.
    raw = text.encode("utf-8", "surrogatepass")
    out = []
    n = min(len(raw) // block_chars, max_blocks)
    for i in range(0, n * block_chars, block_chars):
        h = _xxh(raw[i : i + block_chars], h)
        out.append(h)
    return tuple(out)


def read_body(raw: bytes, block_chars: int, max_blocks: int) -> PromptFacts | BodySkip:
    """Parse one buffered request body. Never raises for client input."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return BodySkip.NOT_JSON
    if not isinstance(body, dict):
        return BodySkip.NOT_OBJECT
    model = body.get("model")
    text = canonical_prompt(body, block_chars * max_blocks)
    if isinstance(text, BodySkip):
        return text
    if not text:
        return BodySkip.EMPTY_PROMPT
    name = model if isinstance(model, str) else ""
    mt = body.get("max_tokens", body.get("max_completion_tokens"))
    return PromptFacts(
        model=name or None,
        prompt_chars=len(text),
        hashes=block_hashes(text, name, block_chars, max_blocks),
        max_tokens=mt if isinstance(mt, int) and not isinstance(mt, bool) else None,
        stream=body.get("stream") is True,
    )


# --- the prefix a decision used, as it travels in PREFIX_HEADER -------------------------------

#: Most blocks a PREFIX_HEADER value may carry (PrefixParams.max_blocks' upper bound).
MAX_HEADER_BLOCKS = 1024
_BIG_ENDIAN = sys.byteorder == "big"


def encode_prefix(block_chars: int, hashes: tuple[int, ...]) -> bytes:
    """`<block_chars>.<base64url of the little-endian 64-bit chain>`: 11 bytes per block, so
    the default 128 blocks are ~1.4 KB on the upstream request and in each access-log entry."""
    a = array.array("Q", hashes)
    if _BIG_ENDIAN:
        a.byteswap()
    return b"%d." % block_chars + base64.urlsafe_b64encode(a.tobytes()).rstrip(b"=")


def decode_prefix(value: str) -> tuple[int, tuple[int, ...]] | None:
    """(block_chars, chain) from a PREFIX_HEADER value; None if it is not one (a peer's
    access-log entry is input like any other: malformed, it is counted and dropped)."""
    head, sep, b64 = value.partition(".")
    if not sep or not head.isdigit() or not b64 or len(b64) > MAX_HEADER_BLOCKS * 11 + 2:
        return None
    try:
        raw = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4))
    except (ValueError, binascii.Error):
        return None
    if not raw or len(raw) % 8:
        return None
    a = array.array("Q", raw)
    if _BIG_ENDIAN:
        a.byteswap()
    return int(head), tuple(a)
