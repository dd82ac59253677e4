"""The prompt string a chat conversation becomes: the tokenizer's chat template, or plain role lines.

Shared by the generation engine and int8 calibration (`caiflow.int8`), so both see prompts alike.
"""

from __future__ import annotations

from typing import Any


def chat_prompt(tokenizer: Any, conversation: list[dict]) -> str:
    """The prompt string for a conversation, ending where the assistant's answer starts; a final
    assistant message is an answer's opening, which the prompt ends with, for the model to go on."""
    opened = bool(conversation) and conversation[-1]["role"] == "assistant"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=not opened, continue_final_message=opened
        )
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in conversation]
    return "\n".join(lines if opened else [*lines, "Assistant:"])
