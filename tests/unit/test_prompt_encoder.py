"""The router's prompt checks: a prompt past the context window is refused before it costs much."""

from __future__ import annotations

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError
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
