"""Inputs a user gives (config, data files, task names, checkpoints): refused early, in one line, naming the fix."""

from __future__ import annotations

import pytest

from dmea_dist.cli import main


def _config(tmp_path, body: str):
    path = tmp_path / "run.yaml"
    path.write_text(body)
    return path


# ------------------------------------------------------------------ model.pretrained


@pytest.mark.parametrize("pretrained", ["missing", "empty"])
def test_a_pretrained_checkpoint_that_cannot_be_loaded_is_a_config_error(tmp_path, capsys, pretrained):
    """A mistyped or empty local model.pretrained folder: one line naming the key, not a transformers traceback."""
    folder = tmp_path / pretrained
    if pretrained == "empty":
        folder.mkdir()
    config = _config(tmp_path, f"data:\n  tasks: [synth.travel.00]\nmodel:\n  pretrained: {folder}\n"
                               f"tracking:\n  enabled: false\n")
    assert main(["run", str(config), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and str(folder) in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing folder", "empty folder", "relative path", "hub name", "org/name"])
def test_the_hint_for_a_checkpoint_that_cannot_be_loaded_fits_what_was_named(tmp_path, monkeypatch, kind):
    """Downloading is the fix for a hub name only: a mistyped folder was told to `hf download` its own path."""
    from dmea_dist.data.tokenizer import not_loadable

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    name = {"missing folder": str(tmp_path / "ckpt"), "empty folder": "empty", "relative path": "./ckpts/gpt2",
            "hub name": "gpt2", "org/name": "openai-community/gpt2"}[kind]
    message = not_loadable("model.pretrained", name, "tokenizer", OSError("not found"))
    assert message.startswith(f"model.pretrained={name!r}: its tokenizer cannot be loaded (OSError: not found); ")
    assert ("hf download" in message) == (kind in ("hub name", "org/name")), message
    if kind == "empty folder":
        assert "needs what save_pretrained writes" in message
    elif kind in ("missing folder", "relative path"):
        assert f"there is no folder {(tmp_path / name).resolve()}" in message


def test_data_show_with_a_tokenizer_folder_that_cannot_be_loaded(tmp_path, capsys):
    assert main(["data", "show", "synth.travel.00", "--tokenizer", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and str(tmp_path / "missing") in err and "Traceback" not in err


# ------------------------------------------------------------------ user tasks


@pytest.mark.parametrize("fields, named", [({"split_ratios": 0.8}, "split_ratios"),
                                           ({"split_ratios": None}, "split_ratios"),
                                           ({"seed": [1]}, "seed"),
                                           ({"seed": "1"}, "seed")])
def test_user_task_fields_of_the_wrong_type_are_data_errors(tmp_path, fields, named):
    """`split_ratios: 0.8` (one number) failed with "'float' object is not iterable" from deep in the loader."""
    from dmea_dist.data.registry import load_task
    from dmea_dist.errors import DataError

    data = tmp_path / "t.jsonl"
    data.write_text("".join(f'{{"context": "c{i}", "answer": "a{i}"}}\n' for i in range(20)))
    with pytest.raises(DataError, match=rf"user task 'mine'.*{named}"):
        load_task("mine", data_root=None, user_tasks={"mine": {"path": str(data), **fields}})


@pytest.mark.parametrize("path", [5, ["a.jsonl"]])
def test_a_user_task_path_that_is_no_path_is_a_data_error(path):
    from dmea_dist.data.registry import load_task
    from dmea_dist.errors import DataError

    with pytest.raises(DataError, match="user task 'mine'.*path"):
        load_task("mine", data_root=None, user_tasks={"mine": {"path": path}})


@pytest.mark.parametrize("name", ["squad/v2", "a\\b"])
def test_a_user_task_name_with_a_path_separator_is_refused(tmp_path, name):
    """The task's folder is tasks/NNN-<name>: `squad/v2` made tasks/000-squad/v2, which neither `dmea report`
    (tasks/*-*/record.json) nor `dmea generate` (tasks/NNN-<name>) finds: the trained task could not be served."""
    from dmea_dist.data.registry import normalize_user_tasks
    from dmea_dist.errors import DataError

    with pytest.raises(DataError, match="user task name .*(/|\\\\)"):
        normalize_user_tasks({name: {"path": str(tmp_path / "t.jsonl")}})


def test_csv_rows_of_empty_cells_are_blank_lines(tmp_path):
    """Spreadsheets save emptied rows as `,,` (one empty cell per column): blank rows, skipped like an empty line,
    where they failed the file as "'context' and 'question' are both empty"."""
    from dmea_dist.data.user_tasks import Sample, read_task_file

    path = tmp_path / "t.csv"
    path.write_text("context,question,answer\r\nc1,,a1\r\n,,\r\nc2,q,a2\r\n, ,\r\n,,\r\n", encoding="utf-8")
    assert read_task_file(path) == [Sample("c1", "", ("a1",)), Sample("c2", "q", ("a2",))]


# ------------------------------------------------------------------ report


def test_report_of_a_run_whose_state_or_record_is_no_json_object(tmp_path, capsys):
    """A state.json or record.json holding a list (edited or damaged outside dmea) is a missing piece, as the
    report treats every missing piece, not an AttributeError traceback."""
    import json

    import yaml

    run = tmp_path / "run"
    (run / "tasks" / "000-synth.travel.00").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "x", "data": {"tasks": ["synth.travel.00"]}}))
    (run / "state.json").write_text(json.dumps([1, 2]))
    (run / "tasks" / "000-synth.travel.00" / "record.json").write_text(json.dumps(["x"]))
    assert main(["report", str(run)]) == 0
    assert (run / "report.html").is_file() and "Traceback" not in capsys.readouterr().err


# ------------------------------------------------------------------ tiny backbone cache


def test_the_cached_tiny_backbone_is_not_reused_for_other_task_text(tmp_path):
    """The BPE is trained on the run's training text, but the cache key held the task names only: after a
    user task's file changed, the next run reused the tokenizer (and backbone) of the old text, unlike a run
    on a machine without the cache. Its words then split into pieces the model never saw as words."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.run import load_tasks, tiny_backbone

    data = tmp_path / "mine.jsonl"
    config = config_from_dict({
        "data": {"tasks": ["mine"], "user_tasks": {"mine": {"path": str(data)}}},
        "model": {"tiny": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 300,
                           "pretrain": {"corpus": "none"}}, "max_length": 64},
        "tracking": {"enabled": False}})
    vocabularies = []
    for word in ("zanzibarian", "quetzalcoatlus"):
        data.write_text("".join(f'{{"context": "{word} {i}", "answer": "{word} {word} {i}"}}\n' for i in range(40)))
        tokenizer, _ = tiny_backbone(config, load_tasks(config), cache_root=tmp_path / "_cache", load_model=False)
        vocabularies.append(tokenizer.get_vocab())
    assert "quetzalcoatlus" in vocabularies[1] and "quetzalcoatlus" not in vocabularies[0]


# ------------------------------------------------------------------ corpora


def test_e2e_file_with_more_columns_than_mr_and_ref(tmp_path):
    """The header check accepts `mr,ref,...` (the cleaned E2E release adds `fixed,orig_mr`), but every row then
    failed as "expected 2 non-empty fields mr,ref": rows are checked against the header's width."""
    from dmea_dist.data.corpora import read_e2e_file

    path = tmp_path / "devset.csv"
    path.write_text('mr,ref,fixed,orig_mr\n"name[A], food[Thai]",A serves Thai.,1,"name[A]"\n'
                    '"name[A], food[Thai]","A has Thai food.",0,"name[A]"\nname[B],B is here.,0,name[B]\n')
    samples = read_e2e_file(path)
    assert [(s.context, s.answer) for s in samples] == [
        ("name[A], food[Thai]", ("A serves Thai.", "A has Thai food.")), ("name[B]", ("B is here.",))]


def test_data_root_and_user_task_files_under_the_home_folder(tmp_path, monkeypatch):
    """`data.root: ~/corpora` and `path: ~/t.jsonl`: the run expands `~` when it saves its config, but the
    input check before it read them as folders named `~` in the working directory and refused the run."""
    from dmea_dist.data.registry import load_task

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "corpora" / "e2e").mkdir(parents=True)
    rows = "".join(f'"name[N{i}]",N{i} is a place.\n' for i in range(40))
    for name in ("devset.csv", "testset_w_refs.csv"):
        (tmp_path / "corpora" / "e2e" / name).write_text("mr,ref\n" + rows)
    assert len(load_task("e2e", data_root="~/corpora")["test"]) == 40
    (tmp_path / "t.jsonl").write_text("".join(f'{{"context": "c{i}", "answer": "a{i}"}}\n' for i in range(20)))
    assert len(load_task("mine", data_root=None, user_tasks={"mine": {"path": "~/t.jsonl"}})["train"]) == 16


def test_a_pretrained_checkpoint_under_the_home_folder(tmp_path, monkeypatch):
    """`model.pretrained: ~/ckpt` was handed to transformers as typed, which took the folder for a hub name
    (the input check refused the run); a `~` path is the home folder's, as data.root's is."""
    from dmea_dist.config import config_from_dict

    monkeypatch.setenv("HOME", str(tmp_path))
    config = config_from_dict({"data": {"tasks": ["e2e"]}, "model": {"pretrained": "~/ckpt/gpt2"}})
    assert config.model.pretrained == str(tmp_path / "ckpt" / "gpt2")
    assert config_from_dict({"data": {"tasks": ["e2e"]}, "model": {"pretrained": "gpt2"}}).model.pretrained == "gpt2"



@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty local Hugging Face cache, the hub not switched off (conftest sets HF_HUB_OFFLINE=1 for the
    suite; a user's machine need not), and every host-name lookup recorded and refused (no network here)."""
    import socket

    import huggingface_hub.constants

    from dmea_dist.offline import OFFLINE_VARS

    lookups = []

    def refuse(host, *args, **kwargs):
        lookups.append(host)
        raise OSError(f"no network in this test ({host})")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for var in OFFLINE_VARS:  # what a `dmea` command sets is undone after the test
        monkeypatch.setenv(var, "0")
    return tmp_path / "hub", lookups


def test_a_hub_name_loads_from_the_local_cache_without_asking_the_hub(tmp_path, capsys, offline_hub):
    """No network at run time: `model.pretrained: gpt2` loads the cached copy. transformers asked huggingface.co
    for every file first (an offline node retried for ~25 s), and huggingface_hub fetched a registry from the
    hub to build its request headers even for a cached file."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.data.tokenizer import train_bpe_tokenizer

    cache, lookups = offline_hub
    repo = cache / "models--dmea-test--tiny"  # huggingface_hub's cache layout: snapshots/<commit>, refs/main
    snapshot = repo / "snapshots" / ("0" * 40)
    tokenizer = train_bpe_tokenizer(["inform name travel a small cached checkpoint"] * 4, vocab_size=300, max_tasks=2)
    tokenizer.save_pretrained(snapshot)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=256, vocab_size=len(tokenizer))
                    ).save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    config = _config(tmp_path, "data:\n  tasks: [synth.travel.00]\n  overlength: truncate\nmodel:\n"
                               "  pretrained: dmea-test/tiny\n  max_tasks: 2\n  bottleneck: 4\n"
                               "tracking:\n  enabled: false\n")
    capsys.readouterr()
    assert main(["model", "summary", str(config)]) == 0  # tokenizer, config.json and weights, as a run loads them
    assert "backbone: dmea-test/tiny  layers=1 d_model=8" in capsys.readouterr().out
    assert lookups == []


def test_a_hub_name_not_in_the_cache_is_refused_at_once_without_the_network(tmp_path, capsys, offline_hub):
    import time

    _, lookups = offline_hub
    config = _config(tmp_path, "data:\n  tasks: [synth.travel.00]\nmodel:\n  pretrained: dmea-test/not-cached\n"
                               "tracking:\n  enabled: false\n")
    started = time.perf_counter()
    assert main(["run", str(config), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained='dmea-test/not-cached'" in err and "downloads nothing" in err, err
    assert "Traceback" not in err
    assert lookups == [] and time.perf_counter() - started < 10


def test_a_synthetic_task_under_two_spellings_is_listed_twice():
    """`synth.travel.3` and `synth.travel.03` draw the same task, and the duplicate check compared names as
    typed: one task could appear twice in a sequence."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.errors import ConfigError

    with pytest.raises(ConfigError, match=r"more than once"):
        config_from_dict({"data": {"tasks": ["synth.travel.3", "synth.hotel.00", "synth.travel.03"]}})
    with pytest.raises(ConfigError, match=r"more than once"):
        config_from_dict({"data": {"tasks": ["synth.travel.00", "synth.travel.0"]}})
    tasks = ["synth.travel.10", "synth.travel.1", "synth.travel.100", "e2e"]  # different tasks
    assert config_from_dict({"data": {"tasks": tasks}}).data.tasks == tasks
