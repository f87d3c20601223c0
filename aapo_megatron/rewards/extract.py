"""Answer extraction from completions and ground-truth columns (plain string work, no math-verify import)."""

from __future__ import annotations

import re
from typing import Optional

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_MARK = "####"


def last_boxed(text: str) -> Optional[str]:
    """Content of the last balanced \\boxed{...} (or \\fbox{...}) in `text`, or None. Linear in len(text)."""
    starts = [m.end() - 1 for m in _BOXED.finditer(text)]  # positions of the opening braces
    if not starts:
        return None
    closing: dict[int, int] = {}  # opening brace -> its closing brace
    stack: list[int] = []
    for pos in range(starts[0], len(text)):
        ch = text[pos]
        if ch == "{":
            stack.append(pos)
        elif ch == "}" and stack:
            closing[stack.pop()] = pos
    for start in reversed(starts):  # an unbalanced (truncated) last box falls back to an earlier one
        if start in closing:
            return text[start + 1 : closing[start]].strip()
    return None


def last_tagged(text: str, tag: str) -> Optional[str]:
    """Content of the last <tag>...</tag> in `text`, stripped, or None."""
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def completion_answer(completion: str, answer_tag: Optional[str] = None) -> Optional[str]:
    """The final answer of a completion: the last <answer_tag> content when a tag is set, else the last \\boxed{}."""
    if answer_tag:
        return last_tagged(completion, answer_tag)
    return last_boxed(completion)


def gold_answer(answer: object) -> str:
    """Reduce a ground-truth value to the answer: GSM8K "... #### 1,234" -> "1234"; a solution -> its last \\boxed{}."""
    text = str(answer).strip()
    if _GSM8K_MARK in text:
        return text.rsplit(_GSM8K_MARK, 1)[1].strip().replace(",", "")
    if "\\boxed" in text or "\\fbox" in text:
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed
    return text
