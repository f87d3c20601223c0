"""Answer extraction from completions and ground-truth columns (plain string work, no math-verify import)."""

from __future__ import annotations

import re
from typing import Optional, Sequence

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_GSM8K_MARK = "####"
# A number not glued to a word or a preceding digit: "-3" counts as negative, "10-3" ends in "3".
_NUMBER = re.compile(r"(?:(?<![\w)])-)?(?<![\w.])\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last balanced, non-empty \\boxed{...} (or \\fbox{...}) in `text`, or None. Linear in len(text).

    An empty box is no answer: an instruct model that echoes the prompt's "\\boxed{}" has marked nothing.
    """
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
    for start in reversed(starts):  # an unbalanced (truncated) or empty last box falls back to an earlier one
        content = text[start + 1 : closing[start]].strip() if start in closing else ""
        if content:
            return content
    return None


def last_tagged(text: str, tag: str) -> Optional[str]:
    """Content of the last non-empty <tag>...</tag> in `text`, stripped, or None."""
    matches = [m.strip() for m in re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)]
    matches = [m for m in matches if m]
    return matches[-1] if matches else None


def last_number(text: str) -> Optional[str]:
    """The final number in `text` ("-3", "1,234.5" -> "1234.5", "3/4"), without thousands separators, or None."""
    matches = _NUMBER.findall(text)
    return matches[-1].replace(",", "") if matches else None


EXTRACTORS = ("boxed", "tag", "last_number")
"""The answer extractors reward.answer_extractors may name, in any order."""

MARKED_EXTRACTORS = ("boxed", "tag")
"""Extractors that need the model to mark its answer (the format reward's marked_answer style checks these)."""


def extract_with(text: str, name: str, answer_tag: Optional[str] = None) -> Optional[str]:
    """One extractor of EXTRACTORS applied to `text`; `tag` reads <answer_tag> (default "answer")."""
    if name == "boxed":
        return last_boxed(text)
    if name == "tag":
        return last_tagged(text, answer_tag or "answer")
    if name == "last_number":
        return last_number(text)
    raise ValueError(f"unknown answer extractor {name!r}; known: {', '.join(EXTRACTORS)}")


def completion_answer(completion: str, answer_tag: Optional[str] = None,
                      extractors: Optional[Sequence[str]] = None) -> Optional[str]:
    """The final answer of a completion: the first hit of `extractors` in order (see EXTRACTORS), or None.

    extractors None keeps the default: the last <answer_tag> content when a tag is set, else the last \\boxed{}.
    """
    if extractors is None:
        extractors = ("tag",) if answer_tag else ("boxed",)
    for name in extractors:
        found = extract_with(completion, name, answer_tag)
        if found is not None:
            return found
    return None


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
