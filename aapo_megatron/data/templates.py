"""Chat messages and prompt rendering: the tokenizer's own chat template, a configured one, "plain" or "raw".

System prompt presets are the ones in the AAPO authors' recipes (github JianxXiong/AAPO):
`aapo_open_rs` (DeepSeek-R1-Distill-Qwen-1.5B on open-rs) and `aapo_open_r1` (Qwen2.5-Math-7B). The
open-rs text keeps the doubled braces of the original YAML (``\\boxed{{}}``): that is what the model saw.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from aapo_megatron.errors import BadInputError

SYSTEM_PROMPTS: dict[str, str] = {
    "aapo_open_rs": (
        "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
        "The assistant first thinks about the reasoning process in the mind and then provides the user with the "
        "answer, and put your final answer within \\boxed{{}} . The reasoning process and answer are enclosed "
        "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here "
        "</think> <answer> answer here </answer>. Note that respond by English, NOT use other languages."
    ),
    "aapo_open_r1": (
        "You are a helpful AI Assistant, designed to provided well-reasoned and detailed responses. You FIRST "
        "think about the reasoning process as an internal monologue and then provide the user with the answer. "
        "The reasoning process MUST BE enclosed within <think> and </think> tags."
    ),
}
"""The paper's system prompts by preset name (verbatim, typos included)."""


class PromptFormatError(BadInputError, ValueError):
    """A prompt value cannot be turned into chat messages (the message says why)."""


def resolve_system_prompt(value: Optional[str]) -> Optional[str]:
    """A preset name -> its text; any other string is the system prompt itself; None / "" -> None."""
    if not value:
        return None
    return SYSTEM_PROMPTS.get(value, value)


def build_messages(prompt: Any, system_prompt: Optional[str]) -> list[dict[str, str]]:
    """Chat messages from a prompt column value (text, or a list of {"role", "content"}), system prompt first."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptFormatError("empty prompt")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise PromptFormatError("empty message list")
        messages = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise PromptFormatError(f"message {i} is not a {{'role': str, 'content': str}} dict")
            messages.append({"role": m["role"], "content": m["content"]})
        if not any(m["content"].strip() for m in messages):
            raise PromptFormatError("empty prompt")
    else:
        raise PromptFormatError(f"prompt must be text or a list of chat messages, got {type(prompt).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def load_chat_template(template: str) -> str:
    """A Jinja template given inline or as a path to a file."""
    if "{" not in template and os.path.isfile(template):
        with open(template, encoding="utf-8") as fh:
            return fh.read()
    if "{" not in template:
        raise PromptFormatError(f"data.chat_template {template!r} is neither 'plain', 'raw', a Jinja template nor a file")
    return template


class PromptRenderer:
    """Renders chat messages to prompt text under `data.chat_template`; configuration errors raise at construction."""

    def __init__(self, tokenizer: Any, chat_template: Optional[str]):
        self.tokenizer = tokenizer
        self.mode = chat_template if chat_template in ("raw", "plain") else "jinja"
        self.template: Optional[str] = None
        if self.mode == "jinja":
            if chat_template is None:
                if not getattr(tokenizer, "chat_template", None):
                    raise PromptFormatError(
                        "the tokenizer has no chat template; set data.chat_template to 'plain', 'raw' or a Jinja template"
                    )
            else:
                self.template = load_chat_template(chat_template)

    def __call__(self, messages: list[dict[str, str]]) -> tuple[str, bool]:
        """(prompt text, whether the tokenizer should add its special tokens when encoding it)."""
        if self.mode == "raw":
            # Pre-templated data (SimpleRL-Zoo's "prompt" column): the first non-system message, verbatim.
            user = next((m for m in messages if m["role"] != "system"), messages[0])
            return user["content"], False
        if self.mode == "plain":
            return "\n\n".join(m["content"] for m in messages) + "\n", True
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        return text, False
