"""User tasks: JSONL/CSV/Parquet reading, validation with file and line, seeded splits."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dmea_dist.data.user_tasks import (
    TASK_FEATURES,
    UserTaskSpec,
    load_user_task,
    read_task_file,
)
from dmea_dist.errors import DataError


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _records(n):
    return [{"context": f"c{i}", "question": f"q{i}", "answer": f"a{i}"} for i in range(n)]


def test_one_file_is_split_by_ratios_disjoint_and_seeded(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", _records(50))
    tasks = load_user_task({"path": str(path)})
    sizes = {s: len(d) for s, d in tasks.items()}
    assert sizes == {"train": 40, "validation": 5, "test": 5}
    contexts = [set(d["context"]) for d in tasks.values()]
    assert set.union(*contexts) == {f"c{i}" for i in range(50)}
    assert sum(len(c) for c in contexts) == 50  # disjoint
    for split in tasks.values():
        assert split.features == TASK_FEATURES
        order = [int(c[1:]) for c in split["context"]]
        assert order == sorted(order)  # each split keeps file order
    again = load_user_task(UserTaskSpec(path=path))
    assert again["test"]["context"] == tasks["test"]["context"]
    other = load_user_task(UserTaskSpec(path=path, seed=1))
    assert other["test"]["context"] != tasks["test"]["context"]


def test_answer_forms_question_default_and_merging(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [
        {"context": "x", "answer": "one"},
        {"context": "y", "question": None, "answer": ["r1", "r2"]},
        {"context": "x", "answer": ["one", "two"], "extra": 1},  # same input as row 1
    ])
    samples = read_task_file(path)
    assert [tuple(s) for s in samples] == [("x", "", ("one", "two")), ("y", "", ("r1", "r2"))]


@pytest.mark.parametrize(("line", "message"), [
    ('{"context": "c", "answer": "a"', "invalid JSON"),
    ('{"context": "c"}', "missing key 'answer'"),
    ('{"answer": "a"}', "missing key 'context'"),
    ('{"context": 3, "answer": "a"}', "'context' must be a string"),
    ('{"context": "c", "answer": 7}', "'answer' must be a string or a list"),
    ('{"context": "c", "answer": []}', "'answer' is empty"),
    ('{"context": "c", "answer": ["ok", " "]}', "'answer' is empty"),
    ('["c", "a"]', "expected an object"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"context": "c0", "answer": "a0"})
    path.write_text(f"{good}\n\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        read_task_file(path)


def test_csv_rows_lists_and_line_numbers(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('context,question,answer\n'
                    '"multi\nline, context",q,"[""r1"", ""r2""]"\n'
                    'c2,,plain answer\n', encoding="utf-8")
    samples = read_task_file(path)
    assert [tuple(s) for s in samples] == [("multi\nline, context", "q", ("r1", "r2")),
                                           ("c2", "", ("plain answer",))]
    # A bad row after a quoted field spanning two lines is reported at its own line (5).
    with path.open("a", encoding="utf-8") as f:
        f.write("c3,q,a,extra\n")
    with pytest.raises(DataError, match=r"t\.csv:5: 4 fields but the header has 3"):
        read_task_file(path)


def test_csv_header_and_empty_answer(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("context,reply\nc,a\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"h\.csv:1: .*'context' and 'answer'"):
        read_task_file(path)
    path.write_text("context,answer\nc,a\nc2,\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"h\.csv:3: 'answer' is empty"):
        read_task_file(path)


def test_parquet_round_trip_with_split_files(tmp_path):
    splits = {
        "train": [{"context": "c0", "question": "q", "answer": ["a", "b"]},
                  {"context": "c1", "question": "", "answer": ["c"]}],
        "validation": [{"context": "c2", "question": "q2", "answer": ["d"]}],
        "test": [{"context": "c3", "question": "", "answer": ["e", "f", "g"]}],
    }
    spec = {}
    for split, rows in splits.items():
        spec[split] = tmp_path / f"{split}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), spec[split])
    tasks = load_user_task(spec, name="pq")
    assert {s: tasks[s].to_list() for s in splits} == splits


def test_parquet_bad_row_names_row_index(tmp_path):
    path = tmp_path / "bad.parquet"
    rows = [{"context": "c", "answer": "a"}, {"context": "d", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"bad\.parquet row 1 \(0-based\): 'answer' must be"):
        read_task_file(path)
    pq.write_table(pa.Table.from_pylist([{"context": "c"}]), path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['answer'\]"):
        read_task_file(path)


def test_empty_split_and_empty_file(tmp_path):
    path = _write_jsonl(tmp_path / "small.jsonl", _records(3))
    with pytest.raises(DataError, match="empty 'validation' split"):
        load_user_task({"path": path})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: no data rows"):
        read_task_file(empty)


def test_spec_validation():
    with pytest.raises(DataError, match=r"unknown key\(s\) \['pth', 'ratio'\]"):
        UserTaskSpec.from_dict({"pth": "x", "ratio": 1})
    with pytest.raises(DataError, match="not both"):
        UserTaskSpec(path="a.jsonl", train="b.jsonl")
    with pytest.raises(DataError, match=r"missing \['test'\]"):
        UserTaskSpec(train="a.jsonl", validation="b.jsonl")
    with pytest.raises(DataError, match="sum to 1"):
        UserTaskSpec(path="a.jsonl", split_ratios=(0.5, 0.2, 0.2))
    with pytest.raises(DataError, match="format"):
        UserTaskSpec(path="a.jsonl", format="xlsx")
    spec = UserTaskSpec.from_dict({"path": "a.jsonl", "split_ratios": [0.6, 0.2, 0.2]})
    assert spec.split_ratios == (0.6, 0.2, 0.2)


def test_format_from_suffix_or_explicit(tmp_path):
    path = _write_jsonl(tmp_path / "data.txt", _records(2))
    with pytest.raises(DataError, match="set the user task's 'format'"):
        read_task_file(path)
    assert len(read_task_file(path, format="jsonl")) == 2
    with pytest.raises(DataError, match="file not found"):
        read_task_file(tmp_path / "nope.jsonl")
