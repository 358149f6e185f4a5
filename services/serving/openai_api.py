"""OpenAI-compatible request parsing and response shaping (pure functions, no I/O).

The official ``openai`` client accepts extra fields, so every response carries
what RL needs beside the standard shape: ``policy_version`` (top level, per
choice, and the ``x-policy-version`` header set by the ingress), the sampled
``token_ids`` per choice, and with ``logprobs`` the per-token log-probs in the
standard places. Unsupported options (``stream``, ``echo``, ``best_of``,
``suffix``, tools) are rejected with a clear 400, never ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16


class RequestError(ValueError):
    """The request body is invalid or asks for something this endpoint does not do."""


@dataclass
class ParsedRequest:
    """What the server needs to run one OpenAI request."""

    prompts: list[list[int]]  # one entry per choice (n copies of each prompt)
    sampling: dict[str, Any]
    want_logprobs: bool
    session_id: str | None = None
    min_version: int | None = None
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _num(body: dict, key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _int(body: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(f"'{key}' must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _reject(body: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if body.get(key):
            raise RequestError(f"'{key}' is not supported by this endpoint")


def _common(body: dict, default_max_tokens: int, max_tokens_key: str = "max_tokens") -> dict[str, Any]:
    if not isinstance(body, dict):
        raise RequestError("request body must be a JSON object")
    _reject(body, ("stream", "tools", "functions", "suffix", "echo"))
    if body.get("best_of") not in (None, 1):
        raise RequestError("'best_of' is not supported by this endpoint")
    max_tokens = _int(body, max_tokens_key, None, 1, 1 << 20)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", default_max_tokens, 1, 1 << 20)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError("'stop' must be a string or a list of strings")
    return {
        "temperature": _num(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _num(body, "top_p", 1.0, 1e-6, 1.0),
        "max_tokens": max_tokens,
        "seed": _int(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        "stop": stop,
    }


def _routing(body: dict, headers: dict[str, str]) -> tuple[str | None, int | None]:
    session = body.get("session_id") or headers.get("x-session-id") or body.get("user") or None
    min_version = body.get("min_policy_version")
    if min_version is not None and (isinstance(min_version, bool) or not isinstance(min_version, int)):
        raise RequestError("'min_policy_version' must be an integer")
    return (str(session) if session is not None else None), min_version


def _as_prompt_lists(prompt: Any, tokenizer: Any) -> list[list[int]]:
    """OpenAI ``prompt``: str | list[str] | list[int] | list[list[int]] -> token id lists."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise RequestError("'prompt' must be a non-empty string, list of strings or token id list(s)")
    if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return [list(prompt)]
    out: list[list[int]] = []
    for item in prompt:
        if isinstance(item, str):
            ids = tokenizer(item, add_special_tokens=False)["input_ids"]
        elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            ids = list(item)
        else:
            raise RequestError("'prompt' items must be strings or non-empty token id lists")
        if not ids:
            raise RequestError("a prompt encodes to zero tokens")
        out.append(ids)
    return out


def parse_completion(body: dict, tokenizer: Any, default_max_tokens: int,
                     headers: dict[str, str] | None = None) -> ParsedRequest:
    sampling = _common(body, default_max_tokens)
    n = _int(body, "n", 1, 1, MAX_N)
    logprobs = _int(body, "logprobs", None, 0, 20)
    prompts = _as_prompt_lists(body.get("prompt"), tokenizer)
    session, min_version = _routing(body, headers or {})
    return ParsedRequest([p for p in prompts for _ in range(n)], sampling, logprobs is not None,
                         session, min_version, str(body.get("model", "")))


def parse_chat(body: dict, tokenizer: Any, default_max_tokens: int,
               headers: dict[str, str] | None = None) -> ParsedRequest:
    sampling = _common(body, default_max_tokens, "max_completion_tokens")
    n = _int(body, "n", 1, 1, MAX_N)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError("each message needs a string 'role' and a string 'content'")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:
        raise RequestError(f"chat template failed: {exc}") from exc
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    want = bool(body.get("logprobs"))
    if body.get("top_logprobs"):
        raise RequestError("'top_logprobs' is not supported (only the sampled token's log-prob)")
    session, min_version = _routing(body, headers or {})
    return ParsedRequest([list(ids)] * n, sampling, want, session, min_version, str(body.get("model", "")))


def _usage(results: list[dict]) -> dict[str, int]:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(len(r["token_ids"]) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def response_version(results: list[dict]) -> int:
    """The version a multi-choice response is labelled with: the oldest one that produced any choice."""
    return min(r["policy_version"] for r in results)


def _token_strings(ids: list[int], tokenizer: Any) -> list[str]:
    return [tokenizer.decode([t]) for t in ids]


def format_completion(req: ParsedRequest, results: list[dict], tokenizer: Any, model_name: str) -> dict:
    choices = []
    for i, r in enumerate(results):
        lp = None
        if req.want_logprobs:
            toks = _token_strings(r["token_ids"], tokenizer)
            offsets, pos = [], 0
            for t in toks:
                offsets.append(pos)
                pos += len(t)
            lp = {"tokens": toks, "token_logprobs": r["logprobs"], "top_logprobs": None, "text_offset": offsets}
        choices.append({"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": lp,
                        "token_ids": r["token_ids"], "policy_version": r["policy_version"],
                        "swap_aborted": r["swap_aborted"]})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(results),
            "policy_version": response_version(results)}


def format_chat(req: ParsedRequest, results: list[dict], tokenizer: Any, model_name: str) -> dict:
    choices = []
    for i, r in enumerate(results):
        lp = None
        if req.want_logprobs:
            toks = _token_strings(r["token_ids"], tokenizer)
            lp = {"content": [{"token": t, "logprob": v, "bytes": list(t.encode()), "top_logprobs": []}
                              for t, v in zip(toks, r["logprobs"])]}
        choices.append({"index": i, "message": {"role": "assistant", "content": r["text"]},
                        "finish_reason": r["finish_reason"], "logprobs": lp, "token_ids": r["token_ids"],
                        "policy_version": r["policy_version"], "swap_aborted": r["swap_aborted"]})
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": _usage(results),
            "policy_version": response_version(results)}


def format_models(model_name: str, version: int) -> dict:
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                        "owned_by": "proxmo", "policy_version": version}]}


def error_body(message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
