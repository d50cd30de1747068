"""Serving inputs and task folders: what `dmea generate` reads is what the user wrote, and the task asked for."""

from __future__ import annotations

import pytest

from dmea_dist.errors import DmeaError
from dmea_dist.serving import read_inputs, recorded_tasks, task_dir


def test_csv_inputs_keep_quoted_newlines_and_line_separators(tmp_path):
    """A quoted CSV cell spanning lines, or holding U+2028, is one input with its text unchanged."""
    path = tmp_path / "inputs.csv"
    path.write_text('context,task\n"line one\nline two",t\n"a\u2028b",t\nc,t\n', encoding="utf-8")
    assert read_inputs(path) == [{"context": "line one\nline two", "task": "t"},
                                 {"context": "a\u2028b", "task": "t"}, {"context": "c", "task": "t"}]


@pytest.mark.parametrize("name, text", [("inputs.csv", "context,task\nx,t\n"),
                                        ("inputs.jsonl", '{"context": "x", "task": "t"}\n')])
def test_inputs_saved_with_a_byte_order_mark_are_read(tmp_path, name, text):
    """Excel's "CSV UTF-8" (and Windows editors) start the file with a BOM; the header still reads `context`."""
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert read_inputs(path) == [{"context": "x", "task": "t"}]


def test_task_dir_finds_the_task_not_one_whose_name_ends_like_it(tmp_path):
    """Task `qa` after task `news-qa`: `tasks/*-qa` also matches 000-news-qa, whose modules are not qa's."""
    for folder in ("000-news-qa", "001-qa"):
        (tmp_path / "tasks" / folder / "modules").mkdir(parents=True)
    (tmp_path / "tasks" / "002-x-qa2").mkdir(parents=True)  # not recorded
    assert recorded_tasks(tmp_path) == ["news-qa", "qa"]
    assert task_dir(tmp_path, "qa") == tmp_path / "tasks" / "001-qa" / "modules"
    assert task_dir(tmp_path, "news-qa") == tmp_path / "tasks" / "000-news-qa" / "modules"
    with pytest.raises(DmeaError, match="has no task 'qa2'"):
        task_dir(tmp_path, "qa2")
    with pytest.raises(DmeaError, match="was not finished"):
        task_dir(tmp_path, "x-qa2")


def test_an_unknown_alias_says_where_the_aliases_are_listed(monkeypatch, tmp_path):
    """The error names a way to list a registered model's aliases that exists (`mlflow models` has no such
    subcommand: serve, predict, build-docker, ...)."""
    from dmea_dist.tracking import readers

    class Client:
        def get_model_version_by_alias(self, name, alias):
            raise LookupError(f"Registered model alias {alias} not found.")

    monkeypatch.setattr(readers, "_reader_client", lambda uri: Client())
    with pytest.raises(readers.TrackingError) as err:
        readers.download_registered_model(uri="sqlite:///x.db", model_uri="models:/run-dmea@nope", dst=tmp_path)
    assert "`mlflow models`" not in str(err.value)
    assert "get_registered_model('run-dmea').aliases" in str(err.value)


def test_a_task_id_finds_its_version_when_its_alias_got_a_suffix(monkeypatch, tmp_path):
    """`models:/NAME@<task id>` mapped the id with task_alias, so a task whose alias collided with another
    task's and got `-t<index>` (task_aliases: `a.b` and `a-b` -> `a-b-t0`, `a-b-t1`) was not found, and
    `a-b` named nobody's alias. The task id now finds the version tagged with it."""
    from pathlib import Path
    from types import SimpleNamespace

    from dmea_dist.tracking import readers
    from dmea_dist.tracking.common import MODEL_ARTIFACT, task_aliases

    aliases = task_aliases(["a.b", "a-b"])
    versions = [SimpleNamespace(version=str(i + 1), run_id=f"run{i}", tags={"task_id": task})
                for i, task in enumerate(aliases)]

    class Client:
        def get_model_version_by_alias(self, name, alias):
            for v in versions:
                if aliases[v.tags["task_id"]] == alias:
                    return v
            raise LookupError(f"Registered model alias {alias} not found.")

        def search_model_versions(self, filter_string):
            assert filter_string == "name = 'run-dmea'"
            return versions

        def download_artifacts(self, run_id, path, dst):
            folder = Path(dst) / path
            (folder / "artifacts" / "run").mkdir(parents=True)
            (folder / "artifacts" / "run" / "from").write_text(run_id)
            return str(folder)

    monkeypatch.setattr(readers, "_reader_client", lambda uri: Client())
    for k, task in enumerate(["a.b", "a-b"]):
        for asked in (task, aliases[task]):
            folder, found = readers.download_registered_model(uri="sqlite:///x.db", model_uri=f"models:/run-dmea@{asked}",
                                                              dst=tmp_path / f"{k}-{asked}")
            assert found == task and (folder / "from").read_text() == f"run{k}"
            assert folder.parent.parent.name == MODEL_ARTIFACT
    with pytest.raises(readers.TrackingError, match="could not load models:/run-dmea@a.c"):
        readers.download_registered_model(uri="sqlite:///x.db", model_uri="models:/run-dmea@a.c", dst=tmp_path / "x")


def test_a_models_uri_task_answers_rows_without_a_task_beside_rows_that_name_others(tiny_gpt2_config, tmp_path,
                                                                                     monkeypatch):
    """`dmea generate models:/NAME@b --input FILE` where some rows name task a and others none: the tasks the
    file named were loaded without b, the task the URI names, so the rows without a task failed with
    "names no task; give one from ['a']" although the source gives one."""
    from dmea_dist import serving
    from tests.unit.serving_case import two_task_run

    run_dir = two_task_run(tiny_gpt2_config, tmp_path, monkeypatch)[0]
    monkeypatch.setattr(serving, "_registered_folder", lambda source, wanted, uri, tmp: (run_dir, "b"))
    served = serving.load_task_model("models:/run-dmea@b", tasks=["a"])
    assert served.task == "b" and served.tasks == ["a", "b"]
    assert serving.load_task_model("models:/run-dmea@b").tasks == ["b"]  # alone: the URI's task only
