"""A request's input (`GenerateInput`), and its prompt's token ids, checked against the
context window before and after encoding (`PromptEncoder`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import jinja2

from pdserve.common import convert
from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError


@dataclass
class GenerateInput:
    params: SamplingParams
    text: str | None = None
    token_ids: Sequence[int] | None = None  # a protobuf field's, not copied until its length is checked
    messages: list[dict[str, str]] | None = None
    request_id: str = ""
    deadline: float | None = None  # time.monotonic() by which the client gives up; honoured downstream
    model: str = ""  # the model the request names; "": the one served


class PromptEncoder:
    def __init__(self, tokenizer, max_model_len: int):
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = len(tokenizer)
        # The longest token's spelling (byte-level and sentencepiece spellings are at least as
        # long as the text they decode to): a bound on characters per token.
        self.max_token_chars = max(map(len, tokenizer.get_vocab()), default=1)

    async def encode(self, inp: GenerateInput) -> list[int]:
        """The prompt's token ids. Encoding runs off the event loop (a long text takes seconds),
        and a text too long for any prompt that fits the context is refused before encoding."""
        if inp.token_ids is not None:
            if len(inp.token_ids) >= self.max_model_len:  # before a Python int each (36 B) is made
                raise InvalidRequestError(
                    "prompt.token_ids", f"{len(inp.token_ids)} tokens; the context window is {self.max_model_len}"
                )
            ids = convert.token_ids(inp.token_ids, "prompt.token_ids", self.vocab_size)
        elif inp.messages is not None:
            if not inp.messages:
                raise InvalidRequestError("prompt.chat", "must have at least one message")
            self._check_length("prompt.chat", sum(len(m.get("content") or "") for m in inp.messages))
            try:
                encoded = await asyncio.to_thread(
                    self.tokenizer.apply_chat_template,
                    inp.messages,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                )
            except (jinja2.TemplateError, ValueError) as e:  # the model's template refuses this chat, or has none
                raise InvalidRequestError("prompt.chat", str(e)) from None
            ids = list(encoded["input_ids"])
        elif inp.text:
            self._check_length("prompt.text", len(inp.text))
            # As vLLM and transformers tokenize a text prompt: with the BOS the model's tokenizer adds.
            ids = await asyncio.to_thread(self.tokenizer.encode, inp.text, add_special_tokens=True)
        else:
            raise InvalidRequestError("prompt", "must not be empty")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError("prompt", f"{len(ids)} tokens; the context window is {self.max_model_len}")
        return ids

    def _check_length(self, field_name: str, chars: int) -> None:
        # No token spells more than max_token_chars characters, so a longer text cannot fit.
        if chars > self.max_model_len * self.max_token_chars:
            raise InvalidRequestError(
                field_name,
                f"{chars} characters; no prompt this long fits the context window of {self.max_model_len} tokens",
            )
