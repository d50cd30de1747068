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


def test_dmea_output_piped_into_head_ends_without_a_traceback():
    """`dmea data show synth.travel.00 | head` (reading a long output) ended in a BrokenPipeError traceback."""
    import subprocess
    import sys

    script = "import sys; from dmea_dist.cli import main; sys.exit(main())"
    proc = subprocess.Popen([sys.executable, "-c", script, "data", "show", "synth.travel.00", "-n", "400",
                             "--vocab-size", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10) == b"task synth"
    proc.stdout.close()  # as head does after its lines
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, stderr
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_data_show_of_a_user_task_without_its_config_says_to_pass_the_config(capsys):
    """`dmea data show mytask` (the README's user task) without --config: "unknown task 'mytask'; ... declare
    other tasks under user tasks with a data file", though the task was declared, in the config not passed."""
    from dmea_dist.cli import main

    assert main(["data", "show", "mytask"]) == 2
    err = capsys.readouterr().err
    assert "under data.user_tasks in the config" in err and "--config CONFIG" in err
