"""Readers keep each row's origin; malformed rows become rejects with file:line; splits are stratified."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tunesmith import data


def test_csv_rows_and_line_numbers_with_multiline_field(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text('text,label\nhello,pos\n"two\nlines",neg\nextra,pos,oops\nlast,neg\n')
    t = data.read(str(p))
    assert [r["text"] for r in t.rows] == ["hello", "two\nlines", "last"]
    assert t.origins == [f"{p}:2", f"{p}:3", f"{p}:6"]
    assert len(t.rejects) == 1 and t.rejects[0].origin == f"{p}:5" and "3 fields" in t.rejects[0].reason


def test_jsonl_reader_rejects_bad_lines(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a", "label": 1}\n\n{bad json\n[1, 2]\n{"text": "b", "label": 0}\n')
    t = data.read(str(p))
    assert [r["label"] for r in t.rows] == [1, 0]
    assert t.origins == [f"{p}:1", f"{p}:5"]
    assert [r.origin for r in t.rejects] == [f"{p}:3", f"{p}:4"]
    assert "malformed JSON" in t.rejects[0].reason and "JSON object" in t.rejects[1].reason


def test_parquet_reader_row_index_origins(tmp_path):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["x", "y", "z"], "label": [0, 1, 0]}), p)
    t = data.read(str(p))
    assert [r["text"] for r in t.rows] == ["x", "y", "z"] and t.origins[2] == f"{p}#2"


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(data.DataError, match="file not found"):
        data.read(str(tmp_path / "nope.csv"))


def test_stratified_split_keeps_class_ratio(tmp_path):
    t = data.Table(rows=[{"y": i % 4 == 0} for i in range(400)], origins=[str(i) for i in range(400)])
    labels = [r["y"] for r in t.rows]
    keep, held = data.split_off(t, 0.25, labels, seed=0)
    assert len(held) == 100 and len(keep) == 300
    assert sum(r["y"] for r in held.rows) == 25                 # 25% positives, exactly as in the whole
    assert set(keep.origins).isdisjoint(held.origins)
