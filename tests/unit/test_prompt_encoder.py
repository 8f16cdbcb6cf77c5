"""The router's prompt checks: a prompt past the context window is refused before it costs much."""

from __future__ import annotations

import json

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError
from pdserve.common.tokenizer import Tokenizer
from pdserve.router.prompt import GenerateInput, PromptEncoder
from pdserve.router.serve import load_tokenizer


class _Unread:
    """A protobuf repeated field's stand-in that knows its length and must not be read."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        raise AssertionError("the ids were read")


async def test_too_many_token_ids_are_refused_on_their_count_alone():
    tokenizer, _ = load_tokenizer("")
    encoder = PromptEncoder(tokenizer, max_model_len=2048)
    with pytest.raises(InvalidRequestError) as e:
        await encoder.encode(GenerateInput(params=SamplingParams(), token_ids=_Unread(2**25)))
    assert e.value.field == "prompt.token_ids"
    assert await encoder.encode(GenerateInput(params=SamplingParams(), token_ids=[1, 2, 3])) == [1, 2, 3]


def _bos_tokenizer(path):
    """A Llama-like tokenizer: its tokenizer.json adds a BOS to every text it encodes."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    backend = Backend(models.WordLevel({"<s>": 0, "hello": 1, "world": 2, "[UNK]": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}{{ bos_token }}{{ m['content'] }}{% endfor %}"
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": template}))
    return Tokenizer.from_dir(path)


async def test_a_text_prompt_gets_the_bos_its_tokenizer_adds_and_a_chat_only_its_templates(tmp_path):
    # As vLLM's completions and transformers' tokenizer(text) do; the chat template writes its own.
    encoder = PromptEncoder(_bos_tokenizer(tmp_path / "tok"), max_model_len=64)
    assert await encoder.encode(GenerateInput(params=SamplingParams(), text="hello world")) == [0, 1, 2]
    chat = [{"role": "user", "content": "hello"}]
    assert await encoder.encode(GenerateInput(params=SamplingParams(), messages=chat)) == [0, 1]
