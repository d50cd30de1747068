"""A user's journey with their own task files: what the commands say about the run and its data."""

from __future__ import annotations

from pathlib import Path

from dmea_dist.config import config_from_dict


def test_an_untracked_run_does_not_name_a_tracking_store_at_its_end():
    """`tracking: {enabled: false}`: the run's last lines said `tracking: sqlite:////.../mlflow.db`, a database
    the run never wrote (nor created), so a user looked for the run there."""
    from dmea_dist import driver

    off = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    line = driver.where_line(Path("/runs/r"), off)
    assert "tracking: off" in line and "mlflow.db" not in line, line
    on = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"uri": "sqlite:////x/mlflow.db"}})
    assert "tracking: sqlite:////x/mlflow.db" in driver.where_line(Path("/runs/r"), on)


def test_a_row_without_context_or_answer_names_the_keys_it_has(tmp_path):
    """A file exported with other column names (`Context`/`Answer`, `input`/`output`, `answers`) failed with
    "missing key 'context'" alone: the user could not tell which of their columns to rename."""
    import pytest

    from dmea_dist.data.user_tasks import read_task_file
    from dmea_dist.errors import DataError

    file = tmp_path / "t.jsonl"
    file.write_text('{"input": "a", "output": "b"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:1: missing key 'context' \(the row's keys: \['input', 'output'\]\)"):
        read_task_file(file)
    file.write_text('{"context": "a", "answers": ["b"]}\n')
    with pytest.raises(DataError, match=r"missing key 'answer' \(the row's keys: \['answers', 'context'\]\)"):
        read_task_file(file)
