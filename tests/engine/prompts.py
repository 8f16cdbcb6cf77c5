"""Prompts of known lengths (1 to 1,500 tokens) built from varied natural text."""

from __future__ import annotations

PARAGRAPHS = [
    "The history of the lighthouse begins in antiquity, when fires on hilltops warned sailors of rocks. ",
    "Modern compilers translate source code through several intermediate representations "
    "before emitting machine code. ",
    "In the kitchen, a good stock is built slowly: bones, onions, carrots and celery simmer for hours. ",
    "Migrating birds navigate using the sun, the stars and the Earth's magnetic field, sometimes all at once. ",
    "A distributed database must decide what to do when the network partitions and replicas disagree. ",
    "The violinist tuned her instrument twice before the concert, listening closely to the open strings. ",
    "Photosynthesis converts light energy into chemical energy stored in the bonds of glucose molecules. ",
    "Old maps often marked unexplored regions with sea monsters, partly as decoration and partly as warning. ",
]


def text_of_tokens(tokenizer, n: int, offset: int = 0) -> list[int]:
    """Exactly n token ids of natural text (varied, not one sentence repeated)."""
    ids: list[int] = []
    i = offset
    while len(ids) < n:
        ids += tokenizer.encode(PARAGRAPHS[i % len(PARAGRAPHS)] + f"Note {i}. ", add_special_tokens=False)
        i += 1
    return ids[:n]


def chat_ids(tokenizer, question: str) -> list[int]:
    """A one-message chat's prompt, the generation prompt added."""
    messages = [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def prompts_by_length(tokenizer) -> list[list[int]]:
    """Eight prompts of 1, 7, 30, 100, 250, 600, 1,000 and 1,500 tokens."""
    chat = lambda q: chat_ids(tokenizer, q)  # noqa: E731
    question = chat("What is the capital of France?")
    out = [tokenizer.encode("Once", add_special_tokens=False)[:1], text_of_tokens(tokenizer, 7, 3), question]
    for n, off in [(100, 1), (250, 2), (600, 4), (1000, 5), (1500, 6)]:
        out.append(text_of_tokens(tokenizer, n - 12, off) + chat("Summarize.")[-12:])
    return out
