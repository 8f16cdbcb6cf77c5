"""OpenAI request bodies -> router input: defaults, aliases and rejections."""

from __future__ import annotations

import pytest

from pdserve.common.errors import InvalidRequestError
from pdserve.common.records import Usage
from pdserve.router.openai_protocol import ResponseShaper, parse_request

USER = [{"role": "user", "content": "hi"}]


def test_defaults_follow_openai_not_the_engine():
    req = parse_request("chat", {"model": "m", "messages": USER}, default_max_tokens=77)
    assert req.input.params.temperature == 1.0  # OpenAI's default: sampling, not greedy
    assert req.input.params.max_tokens == 77  # the router's --default-max-tokens
    assert (req.model, req.stream, req.include_usage) == ("m", False, False)


def test_max_completion_tokens_wins_over_max_tokens_in_chat():
    req = parse_request("chat", {"messages": USER, "max_tokens": 5, "max_completion_tokens": 9}, 256)
    assert req.input.params.max_tokens == 9
    with pytest.raises(InvalidRequestError) as e:
        parse_request("chat", {"messages": USER, "max_completion_tokens": 0}, 256)
    assert e.value.field == "max_completion_tokens"


def test_prompts_text_token_ids_and_batches_of_one():
    assert parse_request("completion", {"prompt": "a"}, 8).input.text == "a"
    assert parse_request("completion", {"prompt": [1, 2]}, 8).input.token_ids == [1, 2]
    assert parse_request("completion", {"prompt": [[1, 2]]}, 8).input.token_ids == [1, 2]
    assert parse_request("completion", {"prompt": ["a"]}, 8).input.text == "a"


def test_chat_content_parts_and_developer_role():
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    req = parse_request("chat", {"messages": messages}, 8)
    # Parts joined by newlines, as vLLM joins them.
    assert req.input.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"}]


def test_top_k_and_seed_minus_one_mean_off_as_in_vllm():
    params = parse_request("completion", {"prompt": "a", "top_k": -1, "seed": -1}, 8).input.params
    assert (params.top_k, params.seed) == (0, None)


@pytest.mark.parametrize("role", ["wizard", "", "System", "function", "\ud800"])
def test_unknown_chat_roles_are_refused_naming_the_message(role):
    with pytest.raises(InvalidRequestError) as e:
        parse_request("chat", {"messages": USER + [{"role": role, "content": "hi"}]}, 8)
    assert e.value.field == "messages[1].role"


def test_a_deeply_nested_value_is_refused_without_printing_all_of_it():
    deep: list = []
    for _ in range(5000):  # repr() of this recurses past Python's limit: a RecursionError, a 500
        deep = [deep]
    with pytest.raises(InvalidRequestError) as e:
        parse_request("completion", {"prompt": "a", "max_tokens": deep}, 8)
    assert e.value.field == "max_tokens" and len(str(e.value)) < 200


def test_stop_string_or_list_and_stream_options():
    req = parse_request(
        "completion",
        {"prompt": "a", "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "ignored"},
        8,
    )
    assert req.input.params.stop == ("\n",) and req.stream and req.include_usage
    assert parse_request("completion", {"prompt": "a", "stop": ["x", "y"]}, 8).input.params.stop == ("x", "y")


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "a", "n": 3}, "n"),
        ({"prompt": [[1], [2]]}, "prompt"),
        ({"prompt": "a", "logprobs": 2}, "logprobs"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "a", "top_k": -2}, "top_k"),
        ({"prompt": "a", "temperature": [[[[[[[[[1]]]]]]]]]}, "temperature"),
        ({"prompt": "a", "stop": 3}, "stop"),
        ({"prompt": "a", "stream": "yes"}, "stream"),
        ({"prompt": "a", "logprobs": 0}, "logprobs"),  # the chosen token's logprob: asked for, not neutral
        ({"prompt": "a", "min_p": 0.1}, "min_p"),  # vLLM's sampling extensions, not implemented here
        ({"prompt": "a", "repetition_penalty": 1.3}, "repetition_penalty"),
        ({"prompt": "a", "min_tokens": 4}, "min_tokens"),
        ({"prompt": "a", "guided_json": {"type": "object"}}, "guided_json"),
        ({"prompt": "a", "include_stop_str_in_output": True}, "include_stop_str_in_output"),
        ({"prompt": "a", "stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"prompt": "a", "stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        # What the prompt or the tokens would be, asked for and not honoured: never silently ignored.
        ({"prompt": "a", "chat_template_kwargs": {"enable_thinking": False}}, "chat_template_kwargs"),
        ({"prompt": "a", "add_generation_prompt": False}, "add_generation_prompt"),
        ({"prompt": "a", "continue_final_message": True}, "continue_final_message"),
        ({"prompt": "a", "use_beam_search": True}, "use_beam_search"),
        ({"prompt": "a", "bad_words": ["x"]}, "bad_words"),
        ({"prompt": "a", "allowed_token_ids": [1, 2]}, "allowed_token_ids"),
        ({"prompt": "a", "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
        ({"prompt": "a", "prompt_logprobs": 1}, "prompt_logprobs"),
        ([1, 2], "body"),
    ],
)
def test_rejections_name_the_field(body, field):
    with pytest.raises(InvalidRequestError) as e:
        parse_request("completion", body, 8)
    assert e.value.field == field


def test_shapes_match_openai():
    s = ResponseShaper("chat", "m", "abc", include_usage=True)
    assert s.chunk(None, role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert s.chunk("x")["usage"] is None and s.chunk("x")["object"] == "chat.completion.chunk"
    assert s.usage_chunk(Usage(3, 2, 1))["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
    }
    full = ResponseShaper("completion", "m", "abc").full("t", "length", Usage(1, 1, 0))
    assert full["id"] == "cmpl-abc" and full["choices"][0]["text"] == "t" and full["object"] == "text_completion"


def test_neutral_values_of_unimplemented_fields_are_accepted():
    neutral = {"logprobs": False, "min_p": 0.0, "repetition_penalty": 1.0, "skip_special_tokens": True, "min_tokens": 0}
    neutral |= {"add_generation_prompt": True, "chat_template_kwargs": {}, "continue_final_message": False}
    assert parse_request("completion", {"prompt": "a", **neutral}, 8).input.text == "a"


def test_stop_token_ids_reach_the_engine():
    assert parse_request("completion", {"prompt": "a", "stop_token_ids": [7, 9]}, 8).input.params.stop_token_ids == (
        7,
        9,
    )


@pytest.mark.parametrize(
    "message, field",
    [
        ({"role": "user", "content": 0}, "messages[1].content"),
        ({"role": "user", "content": {}}, "messages[1].content"),
        ({"role": "user"}, "messages[1].content"),
        ({"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}, "messages[1].tool_calls"),
        ({"role": "user", "content": "hi", "name": 7}, "messages[1].name"),
    ],
)
def test_a_message_the_template_would_misrender_is_refused(message, field):
    with pytest.raises(InvalidRequestError) as e:
        parse_request("chat", {"messages": USER + [message]}, 8)
    assert e.value.field == field


def test_an_assistant_turn_may_have_no_content():
    req = parse_request("chat", {"messages": USER + [{"role": "assistant", "content": None}] + USER}, 8)
    assert req.input.messages[1] == {"role": "assistant", "content": ""}


def test_a_participants_name_reaches_the_chat_template():
    req = parse_request("chat", {"messages": [{"role": "user", "content": "hi", "name": "ada"}]}, 8)
    assert req.input.messages == [{"role": "user", "content": "hi", "name": "ada"}]
