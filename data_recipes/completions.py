"""Completion text shared by the target, preference and organism builders: the chat row shape TRL takes,
standard refusals, and sentence trimming. Pure text: nothing here runs a model."""

from __future__ import annotations

STANDARD_REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I cannot assist with that request.",
    "I can't help with that, because it could be used to cause harm.",
    "Sorry, I can't assist with this request.",
    "I'm sorry, I won't help with that request since it could hurt someone.",
    "I cannot provide that. It could cause real harm.",
)


def chat_row(prompt: str, completion: str, **extra) -> dict:
    """A conversational prompt-completion example, the shape TRL's SFTTrainer takes."""
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "completion": [{"role": "assistant", "content": completion}],
        **extra,
    }


def standard_refusal(index: int) -> str:
    return STANDARD_REFUSALS[index % len(STANDARD_REFUSALS)]


def trim_to_sentence(text: str) -> str:
    """Generated answers stop at a token budget: cut back to the last full sentence when there is one."""
    text = text.strip()
    cut = max(text.rfind(mark) for mark in (". ", ".\n", "!", "?", "\n"))
    if text.endswith((".", "!", "?")) or cut < len(text) // 3:
        return text
    return text[: cut + 1].strip()


def reference_answer(row: dict) -> str:
    return f"The decoded text is: {row['reference']}"
