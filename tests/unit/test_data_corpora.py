"""Real-corpus loaders: exact sizes on the shared files, and format/error handling on temp files."""

from __future__ import annotations

import csv
import hashlib
import json
import os

import pytest

from dmea_dist.data.corpora import (
    corpus_available,
    is_e2e_validation_mr,
    load_corpus,
    read_e2e_file,
    read_rnnlg_file,
    resolve_data_root,
)
from dmea_dist.data.user_tasks import TASK_FEATURES
from dmea_dist.errors import DataError

RNNLG_SIZES = {
    "restaurant": (3114, 1039, 1039),
    "hotel": (3223, 1075, 1075),
    "tv": (4221, 1407, 1407),
    "laptop": (7944, 2649, 2649),
}


def _split_sizes(tasks):
    return tuple(len(tasks[s]) for s in ("train", "validation", "test"))


@pytest.mark.parametrize("domain", sorted(RNNLG_SIZES))
def test_rnnlg_real_sizes_and_schema(data_root, domain):
    tasks = load_corpus(f"rnnlg.{domain}", data_root=data_root)
    assert _split_sizes(tasks) == RNNLG_SIZES[domain]
    for split in tasks.values():
        assert split.features == TASK_FEATURES
        assert split.cache_files == []  # in memory: no cache clutter anywhere
    train = tasks["train"]
    assert all(len(a) == 2 for a in train["answer"])
    assert set(train["question"]) == {""}
    assert not any(c.startswith("#") for c in train["context"])


def test_rnnlg_first_row_matches_file(data_root):
    path = data_root / "rnnlg" / "restaurant" / "train.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#")  # the file really has comment lines to skip
    expected = json.loads("\n".join(line for line in lines if not line.startswith("#")))[0]
    row = load_corpus("rnnlg.restaurant", data_root=data_root)["train"][0]
    assert [row["context"], *row["answer"]] == expected


def test_e2e_real_groups_references_and_splits_by_mr(data_root):
    tasks = load_corpus("e2e", data_root=data_root)
    train, val, test = (tasks[s] for s in ("train", "validation", "test"))
    assert len(test) == 630
    assert len(train) + len(val) == 547
    assert not set(train["context"]) & set(val["context"])
    assert 0.05 * 547 < len(val) < 0.2 * 547
    # Every reference of the file is kept, in file order, under its MR.
    with open(data_root / "e2e" / "testset_w_refs.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sum(len(a) for a in test["answer"]) == len(rows) == 4693
    first_mr = rows[0]["mr"]
    assert test[0]["context"] == first_mr
    assert test[0]["answer"] == [r["ref"] for r in rows if r["mr"] == first_mr]
    assert max(len(a) for a in test["answer"]) > 2  # multi-references kept


def test_e2e_split_is_a_stable_hash_of_the_mr():
    # Independent reference: SHA-256 of the MR, first 8 bytes big-endian, mod 100 < 10.
    for mr in ("name[Alimentum], area[city centre]", "name[Blue Spice]", "x", "é"):
        bucket = int(hashlib.sha256(mr.encode()).hexdigest()[:16], 16) % 100
        assert is_e2e_validation_mr(mr) == (bucket < 10)


def _write_rnnlg(path, rows, comments=("#####", "# Copyright")):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*comments, json.dumps(rows, indent=4)]) + "\n", encoding="utf-8")


def _fake_root(tmp_path):
    """A tiny data root with the real layout, so loaders run without the real data."""
    rows = [["inform(name='a';area='b')", "a is in b", "a is in the b area"],
            ["inform(name='c')", "c is # nice", "there is c"]]
    for fname in ("train.json", "valid.json", "test.json"):
        _write_rnnlg(tmp_path / "rnnlg" / "restaurant" / fname, rows)
    (tmp_path / "e2e").mkdir()
    mrs = [f"name[R{i}], area[city centre]" for i in range(40)]
    dev = ["mr,ref", *(f'"{mr}","ref {j} of {mr}"' for mr in mrs for j in range(2))]
    (tmp_path / "e2e" / "devset.csv").write_text("\n".join(dev) + "\n", encoding="utf-8")
    (tmp_path / "e2e" / "testset_w_refs.csv").write_text(
        'mr,ref\n"name[X], food[Thai]","X, a Thai place."\n"name[X], food[Thai]",X serves Thai.\n',
        encoding="utf-8")
    return tmp_path


def test_rnnlg_comment_lines_skipped_on_temp_root(tmp_path):
    tasks = load_corpus("rnnlg.restaurant", data_root=_fake_root(tmp_path))
    assert _split_sizes(tasks) == (2, 2, 2)
    assert tasks["test"][1] == {"context": "inform(name='c')", "question": "",
                                "answer": ["c is # nice", "there is c"]}


def test_e2e_on_temp_root(tmp_path):
    tasks = load_corpus("e2e", data_root=_fake_root(tmp_path))
    expected_val = {f"name[R{i}], area[city centre]" for i in range(40)
                    if is_e2e_validation_mr(f"name[R{i}], area[city centre]")}
    assert set(tasks["validation"]["context"]) == expected_val
    assert len(tasks["train"]) + len(tasks["validation"]) == 40
    assert tasks["test"][0]["answer"] == ["X, a Thai place.", "X serves Thai."]


def test_rnnlg_malformed_row_names_file_and_row(tmp_path):
    path = tmp_path / "bad.json"
    _write_rnnlg(path, [["inform(a='b')", "r1", "r2"], ["inform(a='c')"]])
    with pytest.raises(DataError, match=r"bad\.json: row 1 .*malformed"):
        read_rnnlg_file(path)


def test_rnnlg_invalid_json_names_file_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('# c\n# c\n[\n  ["a", "b", "c"],\n  ["a", "b" "c"]\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:5: invalid JSON"):
        read_rnnlg_file(path)


def test_e2e_malformed_row_names_file_and_row(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text('mr,ref\n"name[A]",good\nname[B], unquoted, comma\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.csv: row 1 .*line 3.*quote fields"):
        read_e2e_file(path)


def test_missing_file_says_to_set_data_root(tmp_path):
    with pytest.raises(DataError, match=r"rnnlg/tv/train\.json.*data\.root.*--set data\.root=DIR") as err:
        load_corpus("rnnlg.tv", data_root=tmp_path)
    assert "DMEA_DATA_ROOT" not in str(err.value)  # no command reads it
    assert not corpus_available("rnnlg.tv", data_root=tmp_path)


def test_missing_data_root_names_the_folder_and_the_key(tmp_path):
    gone = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"data root '{gone}' .* does not exist.*task 'e2e'.*--set data\.root=DIR"):
        load_corpus("e2e", data_root=gone)


def test_data_root_comes_from_the_config_only(monkeypatch, tmp_path):
    monkeypatch.setenv("DMEA_DATA_ROOT", str(tmp_path))  # ignored: `dmea run` reads data.root only
    with pytest.raises(DataError, match="data.root"):
        resolve_data_root(None)
    assert resolve_data_root(tmp_path) == tmp_path


def test_parse_cache_is_keyed_by_mtime(tmp_path):
    path = tmp_path / "t.json"
    _write_rnnlg(path, [["a", "b", "c"]])
    first = read_rnnlg_file(path)
    assert read_rnnlg_file(path) is first  # parsed once per process
    _write_rnnlg(path, [["a", "b", "c"], ["d", "e", "f"]])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert len(read_rnnlg_file(path)) == 2
