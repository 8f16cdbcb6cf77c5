"""The router's tokenizer (pdserve.common.tokenizer: `tokenizers` and jinja2, no torch or
transformers) gives the token ids and text transformers gives, for SmolLM2's tokenizer and for
two of other families built here: a Qwen2-style byte-level BPE with its ChatML template, and a
Mistral-style SentencePiece-like one whose template uses bos/eos and refuses a bad order."""

from __future__ import annotations

import json

import jinja2
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from pdserve.common import model_loader
from pdserve.common.tokenizer import Tokenizer
from tests.engine.prompts import PARAGRAPHS

TEXTS = [
    "",
    " ",
    "Hello",
    "  leading and trailing  ",
    "line\nbreaks\n\n\tand tabs",
    *PARAGRAPHS,
    "".join(PARAGRAPHS) * 3,
    "Emoji: 👋🏽 👨‍👩‍👧 🇫🇷 — and a lone 🦀.",
    "中文分词测试：模型、缓存和路由。",
    "日本語のテキストと한국어 텍스트",
    "Control tokens in text: <|im_start|>user\nhi<|im_end|> <|endoftext|> <s>[INST] x [/INST]</s>",
    "Numbers 1234567890 3.14159 -42 1e-9, code: def f(x): return x**2  # 😀",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Capital of Japan?"}],
    [
        {"role": "user", "content": "Hi 👋"},
        {"role": "assistant", "content": "Hello! 你好"},
        {"role": "user", "content": "Say it in Korean: 안녕하세요?"},
    ],
    [
        {"role": "user", "content": PARAGRAPHS[0] * 20},
        {"role": "assistant", "content": "Noted.", "tool_calls": None},
        {"role": "user", "content": "<|im_end|> is text here"},
    ],
]

# Block tags without "-" on their own lines: the newline after one and the indent before it are
# dropped only with transformers' trim_blocks and lstrip_blocks. tojson: not jinja's HTML-escaping one.
QWEN2_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant. ' + ({'turns': messages | length, 'q': "<'&'> ü"} | tojson)
        + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>\\n' }}
{%- endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
    {% endif %}
"""
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% endif %}{% endfor %}"
)


def _trained(model, trainer, pre_tokenizer, decoder, normalizer=None) -> Backend:
    backend = Backend(model)
    backend.pre_tokenizer, backend.decoder = pre_tokenizer, decoder
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.train_from_iterator([*PARAGRAPHS, *TEXTS] * 4, trainer)
    return backend


def _save(backend: Backend, path, **kwargs) -> str:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["smollm2", "qwen2-style", "mistral-style"])
def pair(request, tmp_path_factory):
    """(transformers' AutoTokenizer, ours) over the same files."""
    from transformers import AutoTokenizer

    if request.param == "smollm2":
        path = str(model_loader.resolve(weights=False).path)
    elif request.param == "qwen2-style":
        split = pre_tokenizers.Split(
            pattern=__import__("tokenizers").Regex(
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+"
            ),
            behavior="isolated",
        )
        backend = _trained(
            models.BPE(),
            trainers.BpeTrainer(
                vocab_size=600,
                special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
            pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
            decoders.ByteLevel(),
            normalizers.NFC(),
        )
        path = _save(
            backend,
            tmp_path_factory.mktemp("qwen2"),
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            chat_template=QWEN2_TEMPLATE,
        )
    else:
        backend = _trained(
            models.BPE(unk_token="<unk>", byte_fallback=True),
            trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>"]),
            pre_tokenizers.Metaspace(),
            decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()]),
        )
        # Written without transformers: the [INST] tokens are named only in tokenizer_config.json,
        # and loading must add them as special tokens, as transformers does.
        path = tmp_path_factory.mktemp("mistral")
        backend.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "bos_token": "<s>",
                    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "rstrip": False},
                    "unk_token": "<unk>",
                    "extra_special_tokens": ["[INST]", "[/INST]"],
                    "chat_template": MISTRAL_TEMPLATE,
                }
            )
        )
    return AutoTokenizer.from_pretrained(path), Tokenizer.from_dir(path)


def test_the_vocabulary_is_transformers(pair):
    hf, ours = pair
    assert len(ours) == len(hf)
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.special_tokens_map == hf.special_tokens_map


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_text_encodes_and_decodes_as_transformers(pair, text):
    hf, ours = pair
    ids = ours.encode(text, add_special_tokens=False)
    assert ids == hf.encode(text, add_special_tokens=False)
    assert ours.encode(text) == hf.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )


def test_every_token_decodes_alone_as_transformers(pair):
    """What the incremental detokenizer asks for: short windows, partial UTF-8 included."""
    hf, ours = pair
    for i in range(len(ours)):
        assert ours.decode([i], skip_special_tokens=True) == hf.decode(
            [i], skip_special_tokens=True, clean_up_tokenization_spaces=False
        ), i


@pytest.mark.parametrize("chat", CHATS, ids=range(len(CHATS)))
def test_chats_render_and_encode_as_transformers(pair, chat):
    hf, ours = pair
    if "[INST]" in (ours.chat_template or "") and chat[0]["role"] == "system":
        pytest.skip("the mistral-style template refuses a system turn (the next test)")
    for prompt in (True, False):
        assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False) == hf.apply_chat_template(
            chat, add_generation_prompt=prompt, tokenize=False
        )
        assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=True) == {
            "input_ids": list(
                hf.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=True)["input_ids"]
            )
        }


def test_a_template_refusing_the_chat_raises_the_template_error(pair):
    hf, ours = pair
    if "raise_exception" not in (ours.chat_template or ""):
        pytest.skip("this template refuses nothing")
    chat = [{"role": "assistant", "content": "I speak first"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf.apply_chat_template(chat, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        ours.apply_chat_template(chat, tokenize=False)


def test_a_template_cannot_reach_python_internals():
    ours = Tokenizer(Backend(models.BPE()), {}, "{{ namespace(__class__=1) }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    ours.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)


def test_a_tokenizer_without_a_template_says_so():
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer(Backend(models.BPE()), {}, None).apply_chat_template([{"role": "user", "content": "x"}])


def test_a_directory_without_tokenizer_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
