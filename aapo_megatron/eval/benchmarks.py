"""Benchmark files (jsonl / parquet) -> tokenised prompts with ground truth, under a named column layout.

    bench = load_benchmark(BenchmarkSpec.parse("aime24=data/aime24.parquet"), cfg.data, tokenizer)
    bench.prompts[i].input_ids, bench.prompts[i].answer, bench.prompts[i].row

Layouts name the (prompt column, answer column) pairs of the common math benchmarks as published on the
HF hub; a layout with several pairs uses the first one the file has:

    math500        problem / answer                          (HuggingFaceH4/MATH-500)
    aime24         problem / answer, Problem / Answer        (HuggingFaceH4/aime_2024, Maxwell-Jia/AIME_2024)
    amc23          question / answer, problem / answer       (math-ai/amc23, AI-MO/aimo-validation-amc)
    minerva        question / answer, problem / solution     (math-ai/minervamath, knoveleng/Minerva-Math)
    olympiadbench  question / final_answer, problem / answer (Hothan/OlympiadBench, knoveleng/OlympiadBench)
    auto           the first pair of any layout that the file's columns hold
    custom         data.prompt_key / data.answer_key only

Rows are read and rendered by the training data code (`data.readers`, `data.dataset.PromptDataset`), so
templates, system prompts and bad-row handling are the same as in training. An item is identified by its
row number in the file (1-based; the line number for jsonl), which stays fixed across runs.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from aapo_megatron.errors import BadInputError
from aapo_megatron.config import DataConfig
from aapo_megatron.data.dataset import _MISSING, Prompt, PromptDataset, get_field
from aapo_megatron.data.readers import DataError, RowOrError, detect_format, read_rows

LAYOUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "math500": (("problem", "answer"),),
    "aime24": (("problem", "answer"), ("Problem", "Answer")),
    "amc23": (("question", "answer"), ("problem", "answer")),
    "minerva": (("question", "answer"), ("problem", "solution")),
    "olympiadbench": (("question", "final_answer"), ("problem", "answer")),
}
"""Layout name -> candidate (prompt column, answer column) pairs, in order of preference."""

_AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("problem", "answer"), ("question", "answer"), ("Problem", "Answer"), ("question", "final_answer"),
    ("problem", "solution"),
)


class EvalInputError(BadInputError, ValueError):
    """Bad input to an evaluation (missing model or file, unknown column, empty benchmark); names the culprit."""


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark on the command line: a name and a file."""

    name: str
    """Label in tables and outputs (default: the file name without extension)."""
    path: str
    """The .jsonl / .parquet file."""

    @classmethod
    def parse(cls, text: str) -> "BenchmarkSpec":
        """'name=path' or 'path' (name = file stem)."""
        name, sep, path = text.partition("=")
        if not sep or os.path.exists(text):
            path, name = text, os.path.basename(text)
            for ext in (".jsonl.gz", ".jsonl", ".json", ".parquet", ".pq"):
                if name.lower().endswith(ext):
                    name = name[: -len(ext)]
                    break
        if not name or not path:
            raise EvalInputError(f"benchmark {text!r}: expected 'name=path' or a file path")
        return cls(name=name, path=path)


@dataclass
class Benchmark:
    """A loaded benchmark: its prompts (one per item), the columns used and what was skipped."""

    spec: BenchmarkSpec
    """Name and file."""
    prompts: list[Prompt]
    """Items in file order; `Prompt.row` is the item id."""
    prompt_key: str
    """Prompt column used."""
    answer_key: str
    """Answer column used."""
    skipped: int
    """Rows that could not be used (missing/empty fields, over-length prompts)."""
    skipped_detail: str
    """One line: why rows were skipped ('' if none)."""
    fingerprint: str
    """sha256 of the file's bytes and of everything that shapes its prompts (columns, template, limits)."""


def _first_row(path: str) -> Optional[dict[str, Any]]:
    for _, row in read_rows(path):
        if isinstance(row, dict):
            return row
    return None


def resolve_columns(row: dict[str, Any], layout: str, prompt_key: Optional[str], answer_key: Optional[str],
                    where: str) -> tuple[str, str]:
    """(prompt column, answer column) for a file whose first row is `row`, under `layout` and explicit overrides."""
    if layout not in ("auto", "custom") and layout not in LAYOUTS:
        raise EvalInputError(f"unknown benchmark layout {layout!r}; expected auto, custom or one of "
                             f"{', '.join(LAYOUTS)}")
    if layout == "custom" and (prompt_key is None or answer_key is None):
        raise EvalInputError("layout 'custom' needs both data.prompt_key and data.answer_key")
    have = ", ".join(map(str, row)) or "none"

    def present(key: str) -> bool:
        return get_field(row, key) is not _MISSING

    for role, key in (("prompt", prompt_key), ("answer", answer_key)):
        if key is not None and not present(key):
            raise EvalInputError(f"{where}: unknown {role} column {key!r}; the file has columns: {have}")
    if prompt_key is not None and answer_key is not None:
        p_key, a_key = prompt_key, answer_key
    else:
        candidates = LAYOUTS.get(layout, _AUTO_ORDER)
        pair = next(((p, a) for p, a in candidates if present(prompt_key or p) and present(answer_key or a)), None)
        if pair is None:
            wanted = " or ".join(f"{prompt_key or p}/{answer_key or a}" for p, a in candidates)
            raise EvalInputError(f"{where}: no prompt/answer columns of layout {layout!r} (looked for {wanted}); "
                                 f"the file has columns: {have}. Set data.prompt_key and data.answer_key")
        p_key, a_key = prompt_key or pair[0], answer_key or pair[1]
    return p_key, a_key


def _answer_to_text(value: Any) -> Any:
    """A list answer (OlympiadBench's final_answer) -> its single element, or the elements joined by ', '."""
    if isinstance(value, (list, tuple)):
        parts = [str(v) for v in value]
        return parts[0] if len(parts) == 1 else ", ".join(parts)
    return value


def _rows_with_answer(path: str, answer_key: str) -> Iterator[tuple[int, RowOrError]]:
    for rowno, row in read_rows(path):
        if isinstance(row, dict):
            value = get_field(row, answer_key)
            if isinstance(value, (list, tuple)):
                row = dict(row)
                row[answer_key] = _answer_to_text(value)
        yield rowno, row


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_benchmark(spec: BenchmarkSpec, data_cfg: Any, tokenizer: Any) -> Benchmark:
    """Read, map, render and tokenise one benchmark file (`data_cfg` is an EvalDataConfig); EvalInputError if unusable."""
    where = f"benchmark {spec.name!r} ({spec.path})"
    if not os.path.isfile(spec.path):
        raise EvalInputError(f"{where}: file not found")
    try:
        detect_format(spec.path)
        first = _first_row(spec.path)
    except DataError as exc:
        raise EvalInputError(f"{where}: {exc}") from None
    if first is None:
        raise EvalInputError(f"{where} is empty: it has no readable rows")
    p_key, a_key = resolve_columns(first, data_cfg.layout, data_cfg.prompt_key, data_cfg.answer_key, where)
    dcfg = DataConfig(source="jsonl", prompt_key=p_key, answer_key=a_key, system_prompt=data_cfg.system_prompt,
                      chat_template=data_cfg.chat_template, max_prompt_tokens=data_cfg.max_prompt_tokens)
    try:
        ds = PromptDataset.from_rows(_rows_with_answer(spec.path, a_key), dcfg, tokenizer, where)
    except DataError as exc:
        raise EvalInputError(str(exc)) from None
    prompts = list(ds)
    # The fingerprint covers every item (not the max_items cut): a run over the first N items can be
    # continued by a full run. The token ids catch a changed tokenizer or template too.
    h = hashlib.sha256()
    h.update(file_sha256(spec.path).encode())
    for part in (p_key, a_key, data_cfg.system_prompt, data_cfg.chat_template, data_cfg.max_prompt_tokens):
        h.update(repr(part).encode())
    h.update(repr([(p.row, p.input_ids, p.answer) for p in prompts]).encode())
    if data_cfg.max_items:
        prompts = prompts[: data_cfg.max_items]
    return Benchmark(spec=spec, prompts=prompts, prompt_key=p_key, answer_key=a_key, skipped=ds.bad_rows.count,
                     skipped_detail=ds.bad_rows.summary() if ds.bad_rows.count else "", fingerprint=h.hexdigest())


def load_benchmarks(specs: list[BenchmarkSpec], data_cfg: Any, tokenizer: Any) -> list[Benchmark]:
    """Every benchmark, validated before any work starts; names must be unique."""
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise EvalInputError(f"benchmark name(s) {dup} given twice; name them apart with 'name=path'")
    if not specs:
        raise EvalInputError("no benchmark files: pass --data FILE [FILE ...]")
    return [load_benchmark(s, data_cfg, tokenizer) for s in specs]
