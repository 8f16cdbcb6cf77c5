"""Incremental detokenization that streams only valid, final text.

Decoding token by token breaks multi-byte characters and tokenizers that
merge across tokens, so each step decodes a short window of recent tokens
and emits only what changed, holding back text that ends in a replacement
character (an incomplete UTF-8 sequence). Text that could be the start of
a stop string is held back too, so a stop string is never streamed; a stop
token's own text is not output either (vLLM leaves it out).
"""

from __future__ import annotations

_INCOMPLETE = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (), stop_token_ids: tuple[int, ...] = ()
    ):
        self._tok = tokenizer
        self._ids = list(prompt_token_ids[-6:])  # a little context for merges
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = stop
        self._stop_ids = frozenset(stop_token_ids)
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # all output text so far (stop string excluded once found)
        self._emitted = 0
        self.stopped = False

    @classmethod
    def of(cls, tokenizer, prompt_token_ids: list[int], params) -> IncrementalDetokenizer:
        """For a request's SamplingParams: its stop strings and stop token ids."""
        return cls(tokenizer, prompt_token_ids, params.stop, params.stop_token_ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> None:
        if token_id in self._stop_ids:  # it ends the request: its text is not part of the answer
            return
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(_INCOMPLETE):
            new = full[len(prefix) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            self._check_stop(new)
            self.text += new if not self.stopped else ""

    def _check_stop(self, new: str) -> None:
        if not self._stop:
            return
        tail_start = max(0, len(self.text) - self._holdback)
        window = self.text[tail_start:] + new
        hits = [window.find(s) for s in self._stop if s in window]
        if hits:
            self.text = self.text[:tail_start] + window[: min(hits)]
            self.stopped = True

    def flush(self, final: bool) -> str:
        """Text not yet emitted; keeps back a possible stop-string start unless final."""
        end = len(self.text) if (final or self.stopped) else max(self._emitted, len(self.text) - self._holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
