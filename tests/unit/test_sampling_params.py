"""Bad sampling parameters are rejected with an error naming the field."""

import math

import pytest

from pdserve.common.engine.sampling_params import SamplingParams
from pdserve.common.errors import InvalidRequestError


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"max_tokens": 2**32}, "max_tokens"),
        ({"top_p": math.nan}, "top_p"),
        ({"top_p": -0.5}, "top_p"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        # Bounded, as each is matched at every token (3M stop strings blocked the router 0.7 s a token).
        ({"stop": ["x"] * 65}, "stop"),
        ({"stop": ["x" * 1025]}, "stop"),
        ({"stop_token_ids": list(range(65))}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_minus_one_turns_top_k_and_seed_off_as_vllm_does():
    p = SamplingParams(top_k=-1, seed=-1)
    assert (p.top_k, p.seed) == (0, None)
    assert SamplingParams(seed=-2).seed == 2**64 - 2  # another negative int64: its 64-bit pattern, still seeded


def test_defaults_are_greedy_and_valid():
    p = SamplingParams()
    assert p.greedy and p.max_tokens >= 1


def test_lists_become_tuples_so_params_stay_hashable():
    p = SamplingParams(stop=["a"], stop_token_ids=[3])
    assert p.stop == ("a",) and p.stop_token_ids == (3,)
    hash(p)
