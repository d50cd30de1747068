"""Findings of a new user's walk through the README's journeys: each test shows one bug, fixed."""

from __future__ import annotations


def test_a_missing_relative_user_task_file_names_the_directory_it_was_looked_for_in(tmp_path, monkeypatch):
    """A config in another folder naming `path: data/mytask.jsonl` (the README's example) failed with
    "data/mytask.jsonl: file not found" only: nothing said the path is read from the current directory, not the
    config's folder."""
    import pytest

    from dmea_dist.data.user_tasks import read_task_file
    from dmea_dist.errors import DataError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=f"relative path is read from the current directory, {tmp_path}"):
        read_task_file("data/mytask.jsonl")
    with pytest.raises(DataError, match="file not found; check") as err:
        read_task_file(tmp_path / "data/mytask.jsonl")
    assert "current directory" not in str(err.value)
