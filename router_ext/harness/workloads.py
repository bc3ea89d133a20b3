"""Request workloads for the load generator, the demo and the benchmarks.

A workload turns a `random.Random` into a stream of requests (`WorkItem`): the same seed gives
the same requests in the same order, so two benchmark cells (router profiles, peers) see
identical traffic. Text is generated, not sampled from a corpus: ~4 characters per token, the
rule the simulator (and llm-d's approximate prefix scorer) uses to count tokens.

- `uniform`: short prompts of four repeated words, what the load generator always sent.
- `shared-prefix`: G groups x P prompts; every prompt of a group opens with the group's system
  prompt (S tokens, text unique to the group), then a unique question (Q tokens), and asks for
  O output tokens. The order interleaves groups at random, one round of all G x P at a time; the
  next round reuses the system prompts with new questions, so a run can last any time.
- `multi-turn`: chat sessions whose history grows each turn (system prompt, then every previous
  user turn and a placeholder assistant reply), each request carrying the session header.
- `multi-model`: short prompts spread over several base models and their LoRA adapters
  (`{model}-lora-{i}`, the names `router-ext sim --adapters` serves).
"""

from __future__ import annotations

import inspect
import json
import random
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from router_ext.config import SESSION_HEADER

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
#: The simulator's token estimate (and llm-d's without a tokenizer): 4 characters per token.
CHARS_PER_TOKEN = 4

WORKLOADS: tuple[str, ...] = ("uniform", "shared-prefix", "multi-turn", "multi-model")


class WorkloadError(ValueError):
    """A workload name or parameter that cannot be used."""


class UnknownWorkloadError(WorkloadError):
    def __init__(self, name: str) -> None:
        super().__init__(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        self.name = name


class WorkloadParamError(WorkloadError):
    pass


@dataclass(frozen=True, slots=True)
class WorkItem:
    path: str  # CHAT_PATH or COMPLETIONS_PATH
    body: bytes  # JSON
    headers: tuple[tuple[str, str], ...]
    model: str
    group: str  # prefix group, session id or model: how reports break results down
    max_tokens: int


class Workload(Protocol):
    name: str

    def next_item(self, rng: random.Random) -> WorkItem: ...


_LETTERS = string.ascii_lowercase


def generated_text(rng: random.Random, n_chars: int) -> str:
    """Exactly `n_chars` of pseudo-words: two calls share no block of text in practice."""
    parts: list[str] = []
    size = -1  # the joined length: one space fewer than words
    while size < n_chars:
        word = "".join(rng.choices(_LETTERS, k=rng.randint(2, 9)))
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:n_chars]


def _positive(workload: str, **values: int) -> None:
    for key, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise WorkloadParamError(f"workload {workload!r}: {key} must be an integer >= 1")


def _chat_body(model: str, messages: list[dict[str, str]], max_tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        # The final usage chunk is how the load generator counts output tokens of a stream.
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


_UNIFORM_WORDS = ("alpha", "beta", "gamma", "delta")


class Uniform:
    """Short prompts of random words from a four-word vocabulary (the historical load)."""

    name = "uniform"

    def __init__(
        self,
        models: Sequence[str],
        *,
        max_tokens: int = 16,
        prompt_words: int = 32,
        stream: bool = False,
    ) -> None:
        _positive(self.name, max_tokens=max_tokens, prompt_words=prompt_words)
        self.models = tuple(models)
        self.max_tokens = max_tokens
        self.prompt_words = prompt_words
        self.stream = stream

    def next_item(self, rng: random.Random) -> WorkItem:
        words = " ".join(rng.choice(_UNIFORM_WORDS) for _ in range(self.prompt_words))
        # One model draws nothing more, so a seed gives the bodies it always gave.
        model = self.models[0] if len(self.models) == 1 else rng.choice(self.models)
        body = _chat_body(model, [{"role": "user", "content": words}], self.max_tokens, self.stream)
        return WorkItem(CHAT_PATH, body, (), model, "", self.max_tokens)


class SharedPrefix:
    """G groups x P prompts sharing a per-group system prompt (BACKGROUND §7, scaled down).

    Defaults against the published shapes: SGLang `generated-shared-prefix` is 64 groups x 16
    prompts, system 2,048 tokens, question 128, output 256; llm-d's nightly 150 x 5, system
    9,500, question 500, output 1,000. Here: 32 x 8, system 1,536, question 64, output 32
    (groups / 2, prompts / 2, system x 0.75, question / 2, output / 8). What is kept is the
    regime: the prefixes' working set (32 x 1,536 = 49k tokens) is larger than one simulated
    pod's KV cache (2,048 blocks x 16 = 32k tokens) and fits in a 4-pod fleet, so where a
    prefix is routed decides whether it is cached, as on the published fleets. Output is cut
    most: decode is time on this 2-core machine that shows nothing about prefix routing.
    """

    name = "shared-prefix"

    def __init__(
        self,
        models: Sequence[str],
        *,
        groups: int = 32,
        prompts: int = 8,
        system_tokens: int = 1536,
        question_tokens: int = 64,
        output_tokens: int = 32,
        stream: bool = False,
        chat: bool = True,
        seed: int = 0,
    ) -> None:
        _positive(
            self.name,
            groups=groups,
            prompts=prompts,
            system_tokens=system_tokens,
            question_tokens=question_tokens,
            output_tokens=output_tokens,
        )
        self.models = tuple(models)
        self.groups = groups
        self.prompts = prompts
        self.question_chars = question_tokens * CHARS_PER_TOKEN
        self.output_tokens = output_tokens
        self.stream = stream
        self.chat = chat
        # The prefixes are fixed by `seed`, not by the order rng: every cell of a benchmark
        # sends the same documents whatever order it draws.
        self.system_prompts = tuple(
            generated_text(
                random.Random(f"shared-prefix:{seed}:{g}"), system_tokens * CHARS_PER_TOKEN
            )
            for g in range(groups)
        )
        self._pending: list[int] = []

    def next_item(self, rng: random.Random) -> WorkItem:
        if not self._pending:
            self._pending = [g for g in range(self.groups) for _ in range(self.prompts)]
            rng.shuffle(self._pending)
        g = self._pending.pop()
        model = self.models[g % len(self.models)]
        system = self.system_prompts[g]
        question = generated_text(rng, self.question_chars)
        if self.chat:
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": question},
            ]
            body = _chat_body(model, messages, self.output_tokens, self.stream)
            path = CHAT_PATH
        else:
            raw: dict[str, Any] = {
                "model": model,
                "prompt": system + "\n" + question,
                "max_tokens": self.output_tokens,
                "stream": self.stream,
            }
            if self.stream:
                raw["stream_options"] = {"include_usage": True}
            body = json.dumps(raw).encode()
            path = COMPLETIONS_PATH
        return WorkItem(path, body, (), model, f"group-{g}", self.output_tokens)


@dataclass(slots=True)
class _Session:
    id: str
    model: str
    messages: list[dict[str, str]]
    turns: int = 0


class MultiTurn:
    """Chat sessions of `turns` turns, `sessions` of them open at a time.

    Each turn sends the whole history so far (the session's system prompt, every earlier user
    turn and a placeholder assistant reply of `output_tokens`) plus a new user turn, with the
    session header. Open sessions are visited once per round in a random order, never twice in
    a row, so a session's next turn comes about `sessions` requests after its last one, as a
    user reads the answer before typing again; a finished session is replaced by a new one.
    """

    name = "multi-turn"

    def __init__(
        self,
        models: Sequence[str],
        *,
        sessions: int = 32,
        turns: int = 8,
        system_tokens: int = 256,
        user_tokens: int = 64,
        output_tokens: int = 32,
        stream: bool = False,
        seed: int = 0,
    ) -> None:
        _positive(
            self.name,
            sessions=sessions,
            turns=turns,
            system_tokens=system_tokens,
            user_tokens=user_tokens,
            output_tokens=output_tokens,
        )
        self.models = tuple(models)
        self.sessions = sessions
        self.turns = turns
        self.system_chars = system_tokens * CHARS_PER_TOKEN
        self.user_chars = user_tokens * CHARS_PER_TOKEN
        self.output_tokens = output_tokens
        self.stream = stream
        self.seed = seed
        self._open: list[_Session | None] = [None] * sessions
        self._pending: list[int] = []
        self._started = 0
        self._last = -1

    def _new_session(self, rng: random.Random) -> _Session:
        n = self._started
        self._started += 1
        # Its own generator per session, keyed by the workload seed: another seed gives other
        # texts (a benchmark cell never inherits another's prefix cache), the same seed the same.
        system = generated_text(random.Random(f"multi-turn:{self.seed}:{n}"), self.system_chars)
        return _Session(
            id=f"session-{self.seed}-{n}",
            model=self.models[n % len(self.models)],
            messages=[{"role": "system", "content": system}],
        )

    def next_item(self, rng: random.Random) -> WorkItem:
        if not self._pending:
            self._pending = list(range(self.sessions))
            rng.shuffle(self._pending)
            if self._pending[-1] == self._last and self.sessions > 1:
                self._pending[0], self._pending[-1] = self._pending[-1], self._pending[0]
        slot = self._pending.pop()
        self._last = slot
        s = self._open[slot]
        if s is None or s.turns >= self.turns:
            s = self._open[slot] = self._new_session(rng)
        s.messages.append({"role": "user", "content": generated_text(rng, self.user_chars)})
        body = _chat_body(s.model, s.messages, self.output_tokens, self.stream)
        # The reply this turn gets is unknown here; a placeholder of the same length keeps the
        # next turn's prompt growing as a real conversation's does.
        reply = generated_text(rng, self.output_tokens * CHARS_PER_TOKEN)
        s.messages.append({"role": "assistant", "content": reply})
        s.turns += 1
        return WorkItem(
            CHAT_PATH, body, ((SESSION_HEADER, s.id),), s.model, s.id, self.output_tokens
        )


def adapter_names(model: str, adapters: int) -> list[str]:
    """The LoRA adapters `router-ext sim --adapters N` serves for `model`."""
    return [f"{model}-lora-{i}" for i in range(adapters)]


class MultiModel:
    """Short prompts over base models and their adapters: `adapter_share` go to an adapter."""

    name = "multi-model"

    def __init__(
        self,
        models: Sequence[str],
        *,
        adapters: int = 2,
        adapter_share: float = 0.5,
        max_tokens: int = 16,
        prompt_words: int = 32,
        stream: bool = False,
    ) -> None:
        _positive(self.name, max_tokens=max_tokens, prompt_words=prompt_words)
        if not isinstance(adapters, int) or adapters < 0:
            raise WorkloadParamError(f"workload {self.name!r}: adapters must be an integer >= 0")
        if not 0.0 <= adapter_share <= 1.0:
            raise WorkloadParamError(f"workload {self.name!r}: adapter_share must be in 0..1")
        self.models = tuple(models)
        self.adapters = tuple(a for m in self.models for a in adapter_names(m, adapters))
        self.adapter_share = adapter_share if self.adapters else 0.0
        self.max_tokens = max_tokens
        self.prompt_words = prompt_words
        self.stream = stream

    @property
    def targets(self) -> tuple[str, ...]:
        """Every model name a request may carry: bases, then adapters."""
        return (*self.models, *self.adapters)

    def next_item(self, rng: random.Random) -> WorkItem:
        if self.adapters and rng.random() < self.adapter_share:
            model = rng.choice(self.adapters)
        else:
            model = rng.choice(self.models)
        words = " ".join(rng.choice(_UNIFORM_WORDS) for _ in range(self.prompt_words))
        body = _chat_body(model, [{"role": "user", "content": words}], self.max_tokens, self.stream)
        return WorkItem(CHAT_PATH, body, (), model, model, self.max_tokens)


_FACTORIES: dict[str, type[Uniform] | type[SharedPrefix] | type[MultiTurn] | type[MultiModel]] = {
    Uniform.name: Uniform,
    SharedPrefix.name: SharedPrefix,
    MultiTurn.name: MultiTurn,
    MultiModel.name: MultiModel,
}
assert tuple(_FACTORIES) == WORKLOADS


def workload_params(name: str) -> tuple[str, ...]:
    """The keyword parameters `make_workload(name, ...)` accepts."""
    if name not in _FACTORIES:
        raise UnknownWorkloadError(name)
    sig = inspect.signature(_FACTORIES[name])
    return tuple(p for p in sig.parameters if p != "models")


def make_workload(name: str, *, models: Sequence[str] = ("sim-model",), **params: Any) -> Workload:
    """A fresh workload (it keeps state: rounds, open sessions); unknown names/params raise."""
    known = workload_params(name)
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise WorkloadParamError(
            f"workload {name!r}: unknown parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(known)}"
        )
    if isinstance(models, str) or not models or not all(models):
        raise WorkloadParamError(f"workload {name!r}: models must be a non-empty list of names")
    workload: Workload = _FACTORIES[name](tuple(models), **params)
    return workload
