"""The OpenAI wire format: request bodies checked into typed requests, errors, responses and stream chunks.

Requests are checked by hand rather than by pydantic models so that every refusal is a 400 in OpenAI's error shape
that names the field and, for the server's caps, the limit and the flag that sets it.

What a body may hold (both endpoints): ``model``, ``max_tokens`` (or ``max_completion_tokens``), ``temperature``,
``top_p``, ``seed``, ``stop`` (a string or up to 4), ``n`` (1 only), ``stream``, ``stream_options.include_usage``,
and the DiffMAS settings ``latent_steps`` and ``topology``. ``/v1/chat/completions`` takes ``messages``: exactly
one user message, the question (the systems render it into each agent's own prompt, so a system message or an
earlier turn has nowhere to go). ``/v1/completions`` takes ``prompt``: one question, or a list of questions (one
choice each). Fields that ask for something the server does not do (``logprobs``, ``tools``, penalties, ...) are
refused unless they hold their neutral value; ``user``, ``metadata``, ``store`` and ``service_tier`` are accepted
and ignored; any other field is refused as unrecognised, so a misspelt ``latent_step`` is not silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["APIError", "Chunks", "Completion", "GenerationRequest", "Limits", "chat_response", "completion_response",
           "parse_chat", "parse_completion", "read_json", "sse", "sum_usage"]

MAX_STOP = 4  # OpenAI's own cap on stop sequences

# Fields that select something the server does not implement: accepted only with these neutral values.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logprobs": (None, False),
    "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
    "modalities": (None, ["text"]),
}
_IGNORED = {"user", "metadata", "store", "service_tier"}
_COMMON = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n", "stream",
           "stream_options", "latent_steps", "topology"}


class APIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for (each refusal names its limit and flag)."""

    max_request_bytes: int = 1_000_000
    """Request body size (``--max-request-bytes``); answered with 413."""
    max_messages: int = 32
    """Messages in a chat request (``--max-messages``), checked before anything else reads them."""
    max_prompts: int = 8
    """Questions in one /v1/completions request (``--max-prompts``)."""
    max_tokens: int = 1024
    """Tokens the final agent may generate (``--max-tokens-limit``)."""
    default_max_tokens: int = 256
    """``max_tokens`` of a request that sets none (at most ``max_tokens``)."""
    max_question_tokens: int = 2048
    """Tokens of one question (``--max-question-tokens``): every agent's prompt holds it, so it bounds the trace."""
    max_latent_steps: int = 64
    """``latent_steps`` of a request (``--max-latent-steps``)."""

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class GenerationRequest:
    """One checked request: the questions and how to answer them."""

    model: str
    questions: tuple[str, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    latent_steps: int | None = None
    topology: str | None = None


@dataclass(frozen=True)
class Completion:
    """One answer: the final agent's text and tokens, why it ended, and usage."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: str
    """``stop`` (end of turn or a stop string) or ``length`` (max_tokens reached)."""
    usage: dict


def read_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict, name: str, low: int, high: int | None = None, limit_flag: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {value!r}", param=name)
    if value < low:
        raise APIError(400, f"'{name}' must be >= {low}, got {value}", param=name)
    if high is not None and value > high:
        raise APIError(400, f"'{name}' is {value}; this server's limit is {high} ({limit_flag})", param=name,
                       code="limit_exceeded")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (low < value if low_open else low <= value) and value <= high
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"'{name}' must be a number in {interval}, got {value!r}", param=name)
    return float(value)


def _check_fields(body: dict, allowed: set[str]) -> None:
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported")
            continue
        raise APIError(400, f"unrecognized request argument '{name}'", param=name)


def _common(body: dict, questions: tuple[str, ...], limits: Limits) -> GenerationRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is required: one of the ids GET /v1/models lists", param="model")
    if body.get("n") not in (None, 1):
        raise APIError(400, f"'n' must be 1 (one answer per question), got {body['n']!r}", param="n")
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise APIError(400, "give 'max_tokens' or 'max_completion_tokens', not both", param="max_tokens")
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _int(body, name, 1, limits.max_tokens, "--max-tokens-limit")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else [] if stop is None else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", param="stop")
    stream = body.get("stream")
    stream = False if stream is None else stream
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool):
        raise APIError(400, "'stream' must be true or false", param="stream")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "'stream_options' must be an object like {\"include_usage\": true}",
                       param="stream_options")
    topology = body.get("topology")
    if topology is not None and (not isinstance(topology, str) or not topology):
        raise APIError(400, "'topology' must be the name of a served topology", param="topology")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise APIError(400, f"'seed' must be an integer in [0, 2^63), got {seed!r}", param="seed")
    return GenerationRequest(
        model=model, questions=questions,
        max_tokens=max_tokens or min(limits.default_max_tokens, limits.max_tokens),
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0, True),
        seed=seed, stop=tuple(stop), stream=stream, include_usage=stream and bool(options.get("include_usage")),
        latent_steps=_int(body, "latent_steps", 0, limits.max_latent_steps, "--max-latent-steps"), topology=topology)


def _question(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise APIError(400, f"{where} must be a non-empty string", param=where.split("[")[0])
    return value


def parse_chat(body: dict, limits: Limits) -> GenerationRequest:
    """A /v1/chat/completions body: ``messages`` must be one user message, whose text is the question."""
    _check_fields(body, _COMMON | {"messages"})
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", param="messages")
    if len(messages) > limits.max_messages:
        raise APIError(400, f"'messages' has {len(messages)} entries; this server's limit is {limits.max_messages} "
                       "(--max-messages)", param="messages", code="limit_exceeded")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if any(role in ("system", "developer") for role in roles):
        raise APIError(400, "system messages are not supported: each agent of a DiffMAS system has its own system "
                       "prompt; send the question as a single user message", param="messages")
    if roles != ["user"]:
        raise APIError(400, f"send exactly one user message, the question (got roles {roles}): the systems answer "
                       "one question and keep no conversation", param="messages")
    content = messages[0].get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise APIError(400, "only text content parts are supported", param="messages")
        content = "".join(p["text"] for p in content)
    return _common(body, (_question(content, "messages[0].content"),), limits)


def parse_completion(body: dict, limits: Limits) -> GenerationRequest:
    """A /v1/completions body: ``prompt`` is the question (a string), or several (a list: one choice each).

    The prompt is the question the agents are given, exactly like a chat request's user message; there is no
    raw-text continuation mode and no token-id prompt."""
    _check_fields(body, _COMMON | {"prompt"})
    prompt = body.get("prompt")
    prompts = prompt if isinstance(prompt, list) else [prompt]
    if not prompts:
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"'prompt' has {len(prompts)} questions; this server's limit is {limits.max_prompts} "
                       "(--max-prompts)", param="prompt", code="limit_exceeded")
    if any(isinstance(p, list) or isinstance(p, int) for p in prompts):
        raise APIError(400, "token-id prompts are not supported: send the question as text", param="prompt")
    return _common(body, tuple(_question(p, f"prompt[{i}]") for i, p in enumerate(prompts)), limits)


# ------------------------------------------------------------------------------------------------- responses

def chat_response(rid: str, created: int, model: str, done: Completion) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": done.usage}


def completion_response(rid: str, created: int, model: str, done: list[Completion]) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for i, c in enumerate(done)],
            "usage": sum_usage([c.usage for c in done])}


def sum_usage(usages: list[dict]) -> dict:
    """Several answers' usage added up (a completions request with several prompts); the per-agent detail of the
    extension is kept per answer, in order."""
    if len(usages) == 1:
        return usages[0]
    total = {k: sum(u[k] for u in usages) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    total["completion_tokens_details"] = {"reasoning_tokens": sum(u["completion_tokens_details"]["reasoning_tokens"]
                                                                  for u in usages)}
    total["diffmas"] = {"latent_steps": sum(u["diffmas"]["latent_steps"] for u in usages),
                        "trace_positions": sum(u["diffmas"]["trace_positions"] for u in usages),
                        "per_prompt": [u["diffmas"] for u in usages]}
    return total


@dataclass(frozen=True)
class Chunks:
    """The chunks of one streamed response: ``chat.completion.chunk`` objects (``chat``) or ``text_completion``
    ones, where ``index`` says which prompt's answer a chunk belongs to."""

    rid: str
    created: int
    model: str
    chat: bool

    def _chunk(self, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, **extra}

    def _choice(self, index: int, text: str, finish: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            return self._chunk([{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}])
        return self._chunk([{"index": index, "text": text, "finish_reason": finish, "logprobs": None}])

    def opening(self) -> list[dict]:
        """What comes before any text: a chat stream names the role."""
        return [self._choice(0, "", role=True)] if self.chat else []

    def piece(self, index: int, text: str) -> dict:
        return self._choice(index, text)

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, "", reason)

    def usage(self, usage: dict) -> dict:
        return self._chunk([], usage=usage)


def sse(event: dict | str) -> str:
    """One server-sent event: a JSON object, or the closing ``[DONE]``."""
    return f"data: {event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)}\n\n"
