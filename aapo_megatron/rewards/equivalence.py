"""Mathematical equivalence of an extracted answer and the ground truth, with math-verify's `parse` / `verify`.

Both sides are parsed as ``$\\boxed{<text>}$`` so plain (``1/2``, ``0.5``) and LaTeX (``\\frac{1}{2}``)
forms go through the same extraction. math-verify's own signal-based timeouts are off by default
(`mv_timeout_s=None`): the reward pool enforces a per-sample deadline by killing the worker, which
also stops hangs inside C code that a signal cannot interrupt.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Optional

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# math-verify warns once per process that its timeout is disabled; the pool provides it.
logging.getLogger("math_verify").setLevel(logging.ERROR)

_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def parse_math(text: str, mv_timeout_s: Optional[int] = None) -> list[Any]:
    """math-verify parse of one answer string (wrapped in \\boxed{}); [] when nothing parses."""
    return parse("$\\boxed{" + text + "}$", extraction_config=_EXTRACTION, parsing_timeout=mv_timeout_s)


@functools.lru_cache(maxsize=4096)
def _parse_gold_cached(gold: str) -> tuple[Any, ...]:
    return tuple(parse_math(gold))


def math_equal(answer: Optional[str], gold: str, mv_timeout_s: Optional[int] = None) -> float:
    """1.0 if `answer` is equivalent to `gold` (math-verify), 0.0 if not or missing, NaN if `gold` does not parse."""
    gold_parsed = list(_parse_gold_cached(gold)) if mv_timeout_s is None else parse_math(gold, mv_timeout_s)
    if not gold_parsed:
        return math.nan
    if answer is None or not answer.strip():
        return 0.0
    answer_parsed = parse_math(answer, mv_timeout_s)
    if not answer_parsed:
        return 0.0
    # verify is not symmetric: gold first.
    return 1.0 if verify(gold_parsed, answer_parsed, timeout_seconds=mv_timeout_s) else 0.0
