"""The task registry: name resolution, kinds, capping, listing and unknown-name errors."""

from __future__ import annotations

import json

import pytest

from dmea_dist.data.registry import list_tasks, load_task, task_kind
from dmea_dist.data.user_tasks import TASK_FEATURES, UserTaskSpec
from dmea_dist.errors import DataError


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"context": f"ctx {i}", "question": "what?", "answer": [f"ans {i}"]} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_task_kinds():
    assert task_kind("rnnlg.laptop") == "corpus"
    assert task_kind("e2e") == "corpus"
    assert task_kind("synth.movies.7") == "synthetic"
    assert task_kind("mine", user_tasks={"mine": {}}) == "user"


def test_load_corpus_task_and_cap(data_root):
    full = load_task("rnnlg.hotel", data_root=data_root)
    assert {s: len(d) for s, d in full.items()} == {"train": 3223, "validation": 1075,
                                                   "test": 1075}
    capped = load_task("rnnlg.hotel", data_root=str(data_root),
                       max_samples={"train": 5, "test": 2000})
    assert len(capped["train"]) == 5 and len(capped["test"]) == 1075
    assert capped["train"].to_list() == full["train"].select(range(5)).to_list()


def test_load_synthetic_and_user_tasks(tmp_path, user_file):
    synth = load_task("synth.weather.02", data_root=None, synth_seed=4, synth_sizes=(30, 5, 6))
    assert [len(synth[s]) for s in ("train", "validation", "test")] == [30, 5, 6]
    user = load_task("qa", data_root=None,
                     user_tasks={"qa": {"path": str(user_file), "split_ratios": [0.5, 0.25, 0.25]}})
    assert [len(user[s]) for s in ("train", "validation", "test")] == [10, 5, 5]
    assert user["train"].features == TASK_FEATURES
    same = load_task("qa", data_root=None, user_tasks={"qa": UserTaskSpec(
        path=user_file, split_ratios=(0.5, 0.25, 0.25))})
    assert same["test"].to_list() == user["test"].to_list()


def test_unknown_task_lists_names_and_closest_match():
    with pytest.raises(DataError, match=r"'rnnlg\.restaurnt' \(did you mean 'rnnlg\.restaurant'\?\)"
                                        r".*e2e.*synth\.<family>\.<index>"):
        load_task("rnnlg.restaurnt", data_root=None)
    with pytest.raises(DataError, match=r"did you mean 'my_task'\?"):
        task_kind("my_tsak", user_tasks={"my_task": {}})
    with pytest.raises(DataError, match=r"did you mean 'weather'\?"):
        task_kind("synth.wether.01")


def test_user_task_config_errors(user_file):
    with pytest.raises(DataError, match=r"user task 'qa': unknown key\(s\) \['file'\]"):
        load_task("qa", data_root=None, user_tasks={"qa": {"file": str(user_file)}})
    with pytest.raises(DataError, match="shadows a built-in"):
        load_task("e2e", data_root=None, user_tasks={"e2e": {"path": str(user_file)}})
    with pytest.raises(DataError, match="shadows a built-in"):
        list_tasks(data_root=None, user_tasks={"synth.x.1": {"path": str(user_file)}})


def test_max_samples_validation():
    with pytest.raises(DataError, match=r"unknown split\(s\) \['dev'\]"):
        load_task("synth.travel.0", data_root=None, synth_sizes=(4, 2, 2), max_samples={"dev": 1})
    with pytest.raises(DataError, match="positive int"):
        load_task("synth.travel.0", data_root=None, synth_sizes=(4, 2, 2), max_samples={"train": 0})


def test_corpus_without_data_root_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("DMEA_DATA_ROOT", raising=False)
    with pytest.raises(DataError, match=r"set data\.root in the config \(or --set data\.root=DIR"):
        load_task("e2e", data_root=None)


def test_list_tasks(tmp_path, user_file):
    infos = {t.name: t for t in list_tasks(data_root=tmp_path, user_tasks={
        "qa": {"path": str(user_file)}, "gone": {"path": str(tmp_path / "missing.csv")}})}
    assert {n for n, t in infos.items() if t.kind == "corpus"} == {
        "rnnlg.restaurant", "rnnlg.hotel", "rnnlg.tv", "rnnlg.laptop", "e2e"}
    assert not infos["e2e"].available  # tmp_path holds no corpora
    assert infos["qa"].available and not infos["gone"].available
    assert infos["synth.listops.<index>"].kind == "synthetic"
    assert str(user_file) in infos["qa"].source


def test_list_tasks_real_root(data_root):
    assert all(t.available for t in list_tasks(data_root=data_root))
