"""Prompt datasets: rows -> chat messages -> rendered, tokenised, length-filtered prompts with their answers.

    ds = PromptDataset.from_config(cfg.data, tokenizer, split="train")
    p = ds[i]                       # Prompt: input_ids, text, answer, reward_sample()
    pool.score(completions, [p.reward_sample()] * G)

Bad rows (unreadable, missing column, empty prompt or answer, over-length prompt) are skipped and counted
in `ds.bad_rows`; the first few are logged by row number. A source where every row is bad is a DataError.
Column layouts of common math sets (set `data.prompt_key` / `data.answer_key`):

    SimpleRL-Zoo-Data   question / gt_answer   (or prompt / gt_answer with chat_template: raw)
    open-rs             problem  / answer      (solution holds a worked solution with a \\boxed{})
    MATH                problem  / solution
    GSM8K               question / answer      ("... #### 72")
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from aapo_megatron.config import DataConfig
from aapo_megatron.data.readers import DataError, RowOrError, read_rows
from aapo_megatron.data.templates import PromptFormatError, PromptRenderer, build_messages, resolve_system_prompt
from aapo_megatron.rewards.extract import gold_answer

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class Prompt:
    """One usable prompt."""

    row: int
    """Row number in the source (1-based; the line number for jsonl)."""
    messages: list[dict[str, str]]
    """Chat messages (system prompt first when configured)."""
    text: str
    """The rendered prompt given to the tokenizer."""
    input_ids: list[int]
    """Prompt token ids."""
    answer: str
    """Ground truth as in the data (the reward reduces \\boxed{} / "####" forms)."""
    reasoning_gym: Optional[dict[str, Any]] = None
    """{"task", "args", "entry"} for reasoning-gym prompts (scored by the task's own score_answer)."""

    def reward_sample(self) -> dict[str, Any]:
        """The sample dict the reward functions read: {"answer", ["reasoning_gym"]}."""
        sample: dict[str, Any] = {"answer": self.answer}
        if self.reasoning_gym is not None:
            sample["reasoning_gym"] = self.reasoning_gym
        return sample


@dataclass
class BadRows:
    """Skipped rows of one source: counts by reason and the first few messages by row number."""

    total: int = 0
    """Rows read."""
    count: int = 0
    """Rows skipped."""
    reasons: Counter = field(default_factory=Counter)
    """Reason -> rows skipped for it."""
    max_reports: int = 5
    """How many rows `examples` lists."""
    _entries: list[tuple[int, str]] = field(default_factory=list, repr=False)

    def add(self, row: int, reason: str, detail: str) -> None:
        """Count a skipped row."""
        self.count += 1
        self.reasons[reason] += 1
        self._entries.append((row, detail))

    @property
    def examples(self) -> list[str]:
        """The first `max_reports` skipped rows in row order, as "row N: why"."""
        return [f"row {row}: {detail}" for row, detail in sorted(self._entries)[: self.max_reports]]

    def summary(self) -> str:
        """One line: how many rows were skipped, why, and the first few by row number."""
        why = ", ".join(f"{reason}: {n}" for reason, n in self.reasons.most_common())
        shown = self.examples
        more = f" (and {self.count - len(shown)} more)" if self.count > len(shown) else ""
        return f"skipped {self.count} of {self.total} rows ({why}); {'; '.join(shown)}{more}"


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters for log lines."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def get_field(row: dict[str, Any], key: str) -> Any:
    """row[key], following a dotted path into nested dicts ("reward_model.ground_truth"); _MISSING if absent."""
    if key in row:
        return row[key]
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


class PromptDataset:
    """A list of `Prompt`s built from rows, with the bad-row report of the source."""

    def __init__(self, prompts: list[Prompt], bad_rows: BadRows, name: str):
        self.prompts = prompts
        self.bad_rows = bad_rows
        self.name = name

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> Prompt:
        return self.prompts[i]

    def __iter__(self):
        return iter(self.prompts)

    # ----------------------------------------------------------------------- construction

    @classmethod
    def from_config(cls, cfg: DataConfig, tokenizer: Any, split: str = "train") -> "PromptDataset":
        """Load the train or eval split of the configured source (jsonl / parquet file, or generated reasoning-gym)."""
        if split not in ("train", "eval"):
            raise DataError(f"split must be 'train' or 'eval', got {split!r}")
        if cfg.source == "reasoning_gym":
            from aapo_megatron.data.reasoning_gym_source import reasoning_gym_splits

            train_rows, eval_rows = reasoning_gym_splits(cfg)
            rows = train_rows if split == "train" else eval_rows
            name = f"reasoning_gym:{cfg.reasoning_gym_task}/{split}"
            return cls.from_rows(enumerate(rows, start=1), cfg, tokenizer, name, prompt_key="question",
                                 answer_key="answer")
        path = cfg.train_path if split == "train" else cfg.eval_path
        if path is None:
            raise DataError(f"data.{split}_path is not set (data.source={cfg.source!r})")
        return cls.from_rows(read_rows(path, cfg.source), cfg, tokenizer, path)

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[tuple[int, RowOrError]],
        cfg: DataConfig,
        tokenizer: Any,
        name: str,
        prompt_key: Optional[str] = None,
        answer_key: Optional[str] = None,
    ) -> "PromptDataset":
        """Build prompts from (row number, row) pairs; skip and count bad rows; DataError if none is usable."""
        prompt_key = prompt_key or cfg.prompt_key
        answer_key = answer_key or cfg.answer_key
        system_prompt = resolve_system_prompt(cfg.system_prompt)
        bad = BadRows(max_reports=cfg.max_bad_row_reports)
        try:
            render = PromptRenderer(tokenizer, cfg.chat_template)
        except PromptFormatError as exc:
            raise DataError(f"{name}: {exc}") from None
        candidates: list[tuple[int, list[dict[str, str]], str, bool, str, Optional[dict]]] = []
        for rowno, row in rows:
            bad.total += 1
            if isinstance(row, str):
                bad.add(rowno, "unreadable", row)
                continue
            prompt_value = get_field(row, prompt_key)
            answer_value = get_field(row, answer_key)
            missing = [k for k, v in ((prompt_key, prompt_value), (answer_key, answer_value)) if v is _MISSING]
            if missing:
                cols = ", ".join(map(str, row)) or "none"
                bad.add(rowno, "missing column", f"missing column {missing[0]!r} (row has: {cols})")
                continue
            if answer_value is None or not gold_answer(answer_value):
                bad.add(rowno, "empty answer", f"empty answer in column {answer_key!r} ({_short(answer_value)})")
                continue
            try:
                messages = build_messages(prompt_value, system_prompt)
            except PromptFormatError as exc:
                reason = "empty prompt" if str(exc).startswith("empty") else "bad prompt"
                bad.add(rowno, reason, f"{exc} in column {prompt_key!r}")
                continue
            text, special = render(messages)
            candidates.append((rowno, messages, text, special, str(answer_value), row.get("reasoning_gym")))

        prompts = cls._tokenize_and_filter(candidates, tokenizer, cfg.max_prompt_tokens, bad)
        if bad.total == 0:
            raise DataError(f"{name}: no rows")
        if not prompts:
            hint = ""
            if bad.reasons.get("missing column"):
                hint = " Check data.prompt_key / data.answer_key."
            raise DataError(f"{name}: every row was skipped: {bad.summary()}.{hint}")
        if bad.count:
            logger.warning("%s: %s", name, bad.summary())
        return cls(prompts, bad, name)

    @staticmethod
    def _tokenize_and_filter(candidates: list, tokenizer: Any, max_tokens: int, bad: BadRows) -> list[Prompt]:
        prompts: list[Prompt] = []
        for special in (True, False):
            group = [c for c in candidates if c[3] == special]
            if not group:
                continue
            ids = tokenizer([c[2] for c in group], add_special_tokens=special)["input_ids"]
            for (rowno, messages, text, _, answer, gym), input_ids in zip(group, ids):
                prompts.append(Prompt(rowno, messages, text, list(input_ids), answer, gym))
        prompts.sort(key=lambda p: p.row)
        kept = []
        for p in prompts:
            if len(p.input_ids) > max_tokens:
                bad.add(p.row, "too long", f"prompt is {len(p.input_ids)} tokens, over data.max_prompt_tokens={max_tokens}")
            else:
                kept.append(p)
        return kept
