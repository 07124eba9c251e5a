"""How a document and a question become token ids, identically at the origin and in every client.

The document and the question are tokenized separately and their ids concatenated: a joint
tokenization can merge tokens across the boundary and silently change the sequence, and the cache
covers exactly the document's ids. When the tokenizer has a chat template, the document opens a user
turn and the question closes it, so instruction-tuned models answer in their own format.
"""

from __future__ import annotations

from typing import Any

__all__ = ["document_ids", "question_ids"]

_SLOT = "\x00KVCDN-SLOT\x00"


def _frame(tokenizer: Any) -> tuple[str, str]:
    """Text the template puts before and after the user's message."""
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SLOT}], tokenize=False, add_generation_prompt=True
        )
        if isinstance(rendered, str) and rendered.count(_SLOT) == 1:
            head, tail = rendered.split(_SLOT)
            return head, tail
    return "", "\nAnswer:"


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def document_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a document as published and cached."""
    head, _ = _frame(tokenizer)
    return _encode(tokenizer, head + text)


def question_ids(tokenizer: Any, question: str) -> list[int]:
    """Token ids that follow a document's ids to ask a question about it."""
    _, tail = _frame(tokenizer)
    return _encode(tokenizer, "\n\nQuestion: " + question + tail)
