"""gzip-compressed jsonl prompt files (.jsonl.gz / .json.gz) are decompressed, not read as bytes."""

import gzip
import json

import pytest

from aapo_megatron.config import DataConfig
from aapo_megatron.data import DataError, PromptDataset, read_rows

ROWS = [{"problem": f"What is {a} + {a + 1}?", "answer": str(2 * a + 1)} for a in range(6)]


def _write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # really compressed
    return str(path)


@pytest.mark.parametrize("name", ["train.jsonl.gz", "train.json.gz"])
def test_gzip_jsonl_loads_like_the_plain_file(tmp_path, tokenizer, name):
    lines = [json.dumps(r) for r in ROWS]
    plain = tmp_path / "train.jsonl"
    plain.write_text("\n".join(lines) + "\n")
    gz = _write_gz(tmp_path / name, lines[:3] + ["{broken"] + lines[3:])
    cfg = dict(source="jsonl", chat_template="plain", max_prompt_tokens=10_000)
    ref = PromptDataset.from_config(DataConfig(train_path=str(plain), **cfg), tokenizer)
    ds = PromptDataset.from_config(DataConfig(train_path=gz, **cfg), tokenizer)
    assert [(p.text, p.input_ids, p.answer) for p in ds] == [(p.text, p.input_ids, p.answer) for p in ref]
    assert len(ds) == len(ROWS)
    # The one bad row is reported by its line number in the decompressed text; the others were read.
    assert ds.bad_rows.count == 1 and ds.bad_rows.reasons == {"unreadable": 1}
    assert ds.bad_rows.examples == ["row 4: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
    assert [row for row, _ in read_rows(gz)] == [1, 2, 3, 4, 5, 6, 7]


def test_truncated_gzip_is_a_data_error(tmp_path):
    whole = _write_gz(tmp_path / "whole.jsonl.gz", [json.dumps(r) for r in ROWS * 50])
    cut = tmp_path / "cut.jsonl.gz"
    data = open(whole, "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: corrupt gzip data after line \d+"):
        list(read_rows(str(cut)))
