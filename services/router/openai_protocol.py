"""OpenAI request bodies to `GenerateInput`, router events to OpenAI shapes.

Only translation lives here. Ranges and prompt checks stay in SamplingParams
and Router.tokenize, so the HTTP and gRPC paths reject the same input with
the same field names. JSON *types* are checked here, because SamplingParams
assumes Python types: `"temperature": "hot"` must be a 400, not a 500.
"""

from __future__ import annotations

import reprlib
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError
from pdserve.common.records import Usage
from pdserve.router.chat import chat_role
from pdserve.router.prompt import GenerateInput

Kind = Literal["completion", "chat"]

# OpenAI fields, and vLLM's extensions that change what is generated, that pdserve cannot honour:
# accepted only at their neutral values, so a client never silently gets other semantics than it
# asked for.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),  # completions' logprobs: 0 asks for the chosen token's: not neutral
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "min_p": (None, 0),
    "repetition_penalty": (None, 1),
    "min_tokens": (None, 0),
    "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True),
    "guided_json": (None,),
    "guided_regex": (None,),
    "guided_choice": (None,),
    "guided_grammar": (None,),
    "structured_outputs": (None,),
    "use_beam_search": (None, False),
    "length_penalty": (None, 1),
    "prompt_logprobs": (None,),
    "bad_words": (None, []),
    "allowed_token_ids": (None,),
    "truncate_prompt_tokens": (None,),
    "spaces_between_special_tokens": (None, True),
    "add_special_tokens": (None, False),  # chat: the template already has them
    # The chat template's own inputs: the prompt would not be the one asked for (thinking on or off, a
    # continued turn, another template).
    "chat_template": (None,),
    "chat_template_kwargs": (None, {}),
    "add_generation_prompt": (None, True),
    "continue_final_message": (None, False),
    "documents": (None, []),
    "reasoning_effort": (None,),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}


def _neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # Equal and of the same kind: 0 == False in Python, and logprobs: 0 is a request.
    return any(value == n and isinstance(value, bool) == isinstance(n, bool) for n in neutral)


@dataclass
class OpenAIRequest:
    kind: Kind
    model: str | None
    input: GenerateInput
    stream: bool
    include_usage: bool


def parse_request(kind: Kind, body: Any, default_max_tokens: int) -> OpenAIRequest:
    """A decoded JSON body to the router's input; raises InvalidRequestError naming the field."""
    if not isinstance(body, dict):
        raise InvalidRequestError("body", "must be a JSON object")
    for name, neutral in _NEUTRAL.items():
        if not _neutral(body.get(name), neutral):
            raise InvalidRequestError(name, "is not supported by this server")
    if _typed(body, "n", int, 1) != 1:
        raise InvalidRequestError("n", "only n=1 is supported")
    options = _typed(body, "stream_options", dict, {})
    if body.get("stream_options") is not None and not body.get("stream"):
        raise InvalidRequestError("stream_options", "is only allowed with stream: true")  # as OpenAI says
    request_id = uuid.uuid4().hex
    if kind == "chat":
        prompt = {"messages": _messages(body.get("messages"))}
        # max_completion_tokens replaces the deprecated max_tokens in chat.
        tokens_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    else:
        prompt = _prompt(body.get("prompt"))
        tokens_field = "max_tokens"
    model = _typed(body, "model", str)
    return OpenAIRequest(
        kind=kind,
        model=model,
        input=GenerateInput(
            params=_sampling(body, tokens_field, default_max_tokens), request_id=request_id, model=model or "", **prompt
        ),
        stream=_typed(body, "stream", bool, False),
        include_usage=_typed(options, "include_usage", bool, False),
    )


def _typed(body: dict, name: str, kind: type, default: Any = None) -> Any:
    """body[name] if it has the JSON type `kind` (null: default); bool is not a number here."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        what = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object"}[kind]
        raise InvalidRequestError(name, f"must be {what}, got {reprlib.repr(value)}")  # any size, any depth
    return value


def _text(value: str, field: str) -> str:
    """`value`, if it is Unicode text. JSON's \\ud800 escapes decode to lone
    surrogates, which are no text: the tokenizer would fail on them (a 500)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(field, "is not valid Unicode (a lone surrogate escape)") from None
    return value


def _sampling(body: dict, tokens_field: str, default_max_tokens: int) -> SamplingParams:
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list):
        raise InvalidRequestError("stop", "must be a string or a list of strings")
    stop = [_text(s, "stop") if isinstance(s, str) else s for s in stop]
    try:
        return SamplingParams(
            max_tokens=_typed(body, tokens_field, int, default_max_tokens),
            temperature=_typed(body, "temperature", float, 1.0),  # OpenAI's default, not greedy
            top_p=_typed(body, "top_p", float, 1.0),
            top_k=_typed(body, "top_k", int, 0),  # vLLM's extension, used by benchmark tools
            seed=_typed(body, "seed", int),
            stop=stop,
            stop_token_ids=_token_ids(body, "stop_token_ids"),  # vLLM's extension
            ignore_eos=_typed(body, "ignore_eos", bool, False),  # vLLM's extension, likewise
        )
    except InvalidRequestError as e:
        if e.field == "max_tokens" and tokens_field != "max_tokens":
            raise InvalidRequestError(tokens_field, str(e).split(": ", 1)[1]) from None
        raise


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _token_ids(body: dict, name: str) -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(_is_token(t) for t in value):
        raise InvalidRequestError(name, "must be a list of token ids")
    return value


def _prompt(value: Any) -> dict[str, Any]:
    """A string, a list of token ids, or a one-element list of either (a batch of one)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if isinstance(value, str):
        return {"text": _text(value, "prompt")}
    if isinstance(value, list) and all(_is_token(t) for t in value):
        return {"token_ids": value}  # empty, negative or out of vocabulary: Router.tokenize says so
    if isinstance(value, list) and all(isinstance(p, (str, list)) for p in value):
        raise InvalidRequestError("prompt", "several prompts in one request are not supported (n=1 only)")
    raise InvalidRequestError("prompt", "must be a string or a list of token ids")


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError("messages", "must be a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}].role", "each message needs a string role")
        if m.get("tool_calls") or m.get("function_call"):  # a tool call's history: tools are refused
            raise InvalidRequestError(f"messages[{i}].tool_calls", "tool calls are not supported by this server")
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # OpenAI's: an assistant turn may have none
            content = ""
        if isinstance(content, list):  # content parts: text only, joined by newlines as vLLM joins them
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise InvalidRequestError(f"messages[{i}].content", "only text content parts are supported")
            content = "\n".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise InvalidRequestError(f"messages[{i}].content", "must be a string or a list of text parts")
        message = {
            "role": chat_role(m["role"], f"messages[{i}].role"),
            "content": _text(content, f"messages[{i}].content"),
        }
        if m.get("name") is not None:  # a participant's name: the chat template's to render, as vLLM passes it
            if not isinstance(m["name"], str):
                raise InvalidRequestError(f"messages[{i}].name", "must be a string")
            message["name"] = _text(m["name"], f"messages[{i}].name")
        out.append(message)
    return out


def usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


class ResponseShaper:
    """Builds one request's response objects: one id and `created` for all its chunks."""

    def __init__(self, kind: Kind, model: str, request_id: str, include_usage: bool = False):
        self.kind = kind
        self.model = model
        self.include_usage = include_usage
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        """A streamed choice: text (or, in chat, a delta; role=True opens the message)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            out = {**self._head("text_completion"), "choices": [choice]}
        if self.include_usage:
            out["usage"] = None  # as OpenAI: null on every chunk but the last
        return out

    def usage_chunk(self, counts: Usage) -> dict[str, Any]:
        """The extra last chunk of stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(counts)}

    def full(self, text: str, finish_reason: str, counts: Usage) -> dict[str, Any]:
        """The whole non-streamed response."""
        if self.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage(counts)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(counts)}
