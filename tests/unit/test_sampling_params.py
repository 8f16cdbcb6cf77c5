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
        # Refused as the workers would get them, in float32: inf and 0 there.
        ({"temperature": 1e39}, "temperature"),
        ({"top_p": 1e-46}, "top_p"),
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


def test_a_temperature_below_1e_5_is_greedy_as_in_vllm_and_samples_without_nan():
    import torch

    from pdserve.common.engine.sampler import sample

    logits = torch.tensor([[0.0, 3.0, 1.0, -2.0]])
    for t in (1e-39, 1e-30, 9e-6):  # dividing by 1e-39 in float32 gave a NaN probability: the step failed
        params = SamplingParams(temperature=t)
        assert params.greedy and sample(logits, [params], [None]) == [1]
    assert not SamplingParams(temperature=1e-5).greedy


def test_distinct_seeds_and_positions_draw_from_distinct_generators():
    import torch

    from pdserve.common.engine.sampler import seeded

    def draw(seed: int, position: int) -> float:
        return float(torch.rand(1, generator=seeded(torch.Generator(), SamplingParams(seed=seed), position)))

    assert draw(5, 3) == draw(5, 3)  # reproducible
    # Summed, these pairs drew alike: a vLLM client's seed -5 (2**64 - 5) and 2**63 - 5, and s at p + 1,000,003
    # with s + 1 at p.
    assert draw(2**64 - 5, 0) != draw(2**63 - 5, 0)
    assert draw(7, 1_000_003) != draw(8, 0)
