"""Evaluation outputs: an append-only, fsync'd responses.jsonl (the resume log), fingerprint.json, summary.json.

    store = ResultsStore.open(out_dir, fingerprint, overwrite=False)   # refuses a different model/sampling/data
    store.done("aime24", n)                                           # {item row: [n records]} already finished
    store.append(records)                                             # one write + fsync per batch of items
    store.write_summary(summary)                                      # atomic (tmp file + rename)

Every response is one JSON line keyed by (benchmark, index, sample). A kill can tear at most the last line;
opening the store cuts the file back to its last complete line, so appends stay well-formed. An item counts
as done only when all n of its samples are present; a later record for the same key replaces an earlier one.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional

from aapo_megatron.eval.benchmarks import EvalInputError

RESPONSES = "responses.jsonl"
SUMMARY = "summary.json"
FINGERPRINT = "fingerprint.json"
OUTPUT_FILES = (RESPONSES, SUMMARY, FINGERPRINT)


def _json_safe(value: Any) -> Any:
    """NaN / inf -> strings (json.dumps would write invalid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to `path` via a temporary sibling, fsync and rename: readers see the old or the new file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(_json_safe(obj), fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_responses(path: str, repair: bool = False) -> list[dict[str, Any]]:
    """Every complete record of a responses.jsonl; a torn last line is ignored (and cut off when `repair`)."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as fh:
        data = fh.read()
    end = data.rfind(b"\n") + 1  # bytes after the last newline are a torn write
    records = []
    for lineno, line in enumerate(data[:end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise EvalInputError(f"{path}: line {lineno} is corrupt ({exc.msg}); rerun with --overwrite") from None
    if repair and end < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def completed_items(records: Iterable[dict[str, Any]], benchmark: str, n: int) -> dict[int, list[dict[str, Any]]]:
    """{item index: its n records in sample order} for the items of `benchmark` with all n samples present."""
    by_item: dict[int, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r.get("benchmark") == benchmark:
            by_item.setdefault(int(r["index"]), {})[int(r["sample"])] = r
    return {i: [s[j] for j in range(n)] for i, s in sorted(by_item.items()) if all(j in s for j in range(n))}


def fingerprint_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two fingerprints: 'model', 'sampling', 'reward', 'benchmark NAME' (new benchmarks are fine)."""
    diffs = [key for key in ("model", "sampling", "reward") if old.get(key) != new.get(key)]
    old_b, new_b = old.get("benchmarks", {}), new.get("benchmarks", {})
    diffs += [f"benchmark {name!r}" for name in sorted(new_b) if name in old_b and old_b[name] != new_b[name]]
    return diffs


class ResultsStore:
    """The output directory of one evaluation (see the module docstring)."""

    def __init__(self, out_dir: str, records: list[dict[str, Any]]):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, RESPONSES)
        self.records = records
        """Records read at open plus those appended since."""

    @classmethod
    def check(cls, out_dir: str, fingerprint: dict[str, Any], overwrite: bool) -> None:
        """Raise EvalInputError if `out_dir` holds results of a different model/sampling/data (without overwrite)."""
        fp_path = os.path.join(out_dir, FINGERPRINT)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise EvalInputError(f"output path {out_dir} exists and is not a directory")
        if overwrite or not os.path.isfile(fp_path):
            if not overwrite and os.path.isfile(os.path.join(out_dir, RESPONSES)):
                raise EvalInputError(f"{out_dir} has {RESPONSES} but no {FINGERPRINT}: cannot tell what it was "
                                     "evaluated with; pass --overwrite or choose another --out")
            return
        try:
            with open(fp_path) as fh:
                old = json.load(fh)
        except (OSError, ValueError) as exc:
            raise EvalInputError(f"{fp_path} is unreadable ({exc}); pass --overwrite") from None
        diffs = fingerprint_differences(old, fingerprint)
        if diffs:
            raise EvalInputError(
                f"{out_dir} holds results of a different evaluation ({', '.join(diffs)} changed); refusing to mix "
                "them: pass --overwrite to discard them, or choose another --out")

    @classmethod
    def open(cls, out_dir: str, fingerprint: dict[str, Any], overwrite: bool = False) -> "ResultsStore":
        """Create or reopen `out_dir` for `fingerprint` (see `check`); cuts a torn last line off responses.jsonl."""
        cls.check(out_dir, fingerprint, overwrite)
        os.makedirs(out_dir, exist_ok=True)
        if overwrite:
            for name in OUTPUT_FILES:
                if os.path.exists(os.path.join(out_dir, name)):
                    os.remove(os.path.join(out_dir, name))
        fp_path = os.path.join(out_dir, FINGERPRINT)
        merged = dict(fingerprint)
        if os.path.isfile(fp_path):  # keep earlier benchmarks' fingerprints (a resumed run may name fewer files)
            with open(fp_path) as fh:
                old = json.load(fh)
            merged["benchmarks"] = {**old.get("benchmarks", {}), **fingerprint.get("benchmarks", {})}
        write_json_atomic(fp_path, merged)
        return cls(out_dir, read_responses(os.path.join(out_dir, RESPONSES), repair=True))

    def done(self, benchmark: str, n: int) -> dict[int, list[dict[str, Any]]]:
        """Finished items of `benchmark`: {index: n records}."""
        return completed_items(self.records, benchmark, n)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append records as JSON lines in one write, then flush and fsync (durable before returning)."""
        if not records:
            return
        data = "".join(json.dumps(_json_safe(r), ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        with open(self.path, "ab") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        self.records.extend(records)

    def write_summary(self, summary: dict[str, Any]) -> str:
        """Write summary.json atomically; returns its path."""
        path = os.path.join(self.out_dir, SUMMARY)
        write_json_atomic(path, summary)
        return path


def load_summary(out_dir: str) -> Optional[dict[str, Any]]:
    """summary.json of an output directory, or None."""
    path = os.path.join(out_dir, SUMMARY)
    if not os.path.isfile(path):
        return None
    with open(path) as fh:
        return json.load(fh)
