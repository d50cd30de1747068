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
