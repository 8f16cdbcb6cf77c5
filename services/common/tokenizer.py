"""A model's tokenizer from its files, with neither torch nor transformers.

The router and the KV store read `tokenizer.json` through `tokenizers` and render chat templates through
`chat_template`, with the names and defaults of the part of transformers' tokenizer the router uses.
Why, and what it saved: docs/benchmarks.md ("A router without torch").
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from pdserve.common import chat_template

# transformers' named special tokens (SPECIAL_TOKENS_ATTRIBUTES): what a chat template sees as variables.
_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _added(value: str | dict) -> AddedToken:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken's fields."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    fields = {k: value[k] for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
    return AddedToken(value["content"], special=True, **{"normalized": False, **fields})


def _template(path: Path, config: dict) -> str | None:
    if (file := path / "chat_template.jinja").is_file():
        return file.read_text()
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the one used without tools
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


class Tokenizer:
    def __init__(self, backend: Backend, special_tokens: dict[str, str], template: str | None):
        self._backend = backend
        self.special_tokens_map = special_tokens  # bos_token, eos_token, ... as text
        self.chat_template = template

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """From a Hugging Face model directory (tokenizer.json, tokenizer_config.json, chat template)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{path}: no tokenizer.json (a fast tokenizer's file; transformers' "
                f"AutoTokenizer.from_pretrained(...).save_pretrained(...) writes one)"
            )
        backend = Backend.from_file(str(path / "tokenizer.json"))
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        named = {k: config[k] for k in _NAMED if config.get(k) is not None}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens")) or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        # As transformers does on load: every special token it names is a special added token.
        backend.add_special_tokens([_added(v) for v in [*named.values(), *extra]])
        special = {k: v if isinstance(v, str) else v["content"] for k, v in named.items()}
        return cls(backend, special, _template(path, config))

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(
        self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        if clean_up_tokenization_spaces:
            raise NotImplementedError("clean_up_tokenization_spaces (a WordPiece clean-up; pass False)")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        return_dict: bool = False,
    ):
        """The chat's prompt: its text, its ids, or {"input_ids": ids} (return_dict), as transformers returns."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; send text or token ids")
        text = chat_template.render(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=self.special_tokens_map,
        )
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)  # the template writes its own special tokens
        return {"input_ids": ids} if return_dict else ids
