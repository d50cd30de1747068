"""Run files: readable by colleagues, written atomically, read back with clear errors and in task order."""

from __future__ import annotations

import json
import math
import os
import stat

import numpy as np
import pytest

from dmea_dist.driver import write_reports
from dmea_dist.evaluation import plots
from dmea_dist.evaluation.run_data import load_run
from dmea_dist.serving import recorded_tasks, task_dir
from dmea_dist.state import STATE_FILE, RunState, StateError, load_state, save_state, write_json


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_and_record_files_get_the_mode_a_plain_open_gives(tmp_path):
    """mkstemp makes 0600 files: a colleague on a shared filesystem could not read state.json or record.json."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    state = save_state(RunState.new(["a"]), tmp_path)
    record = write_json(tmp_path / "tasks" / "000-a" / "record.json", {"task_id": "a"})
    assert _mode(state) == _mode(plain)
    assert _mode(record) == _mode(plain)


def _reports(run_dir, R, metrics):
    return write_reports(run_dir, None, R, metrics, similarity=np.zeros_like(R), paths=None)


def test_reports_half_written_by_the_serialiser_keep_the_previous_files(tmp_path, monkeypatch):
    """A failure while R.npy is being written (a killed run, a full disk) leaves the previous R.npy whole."""
    before = np.eye(2)
    np.save(tmp_path / "R.npy", before)
    (tmp_path / "metrics.json").write_text(json.dumps({"final_average": 1.0}))

    def half_save(file, arr, *args, **kwargs):  # the serialiser writes the header, then dies
        if isinstance(file, str | os.PathLike):
            with open(file, "wb") as handle:
                handle.write(b"\x93NUMPY")
        else:
            file.write(b"\x93NUMPY")
        raise OSError("killed")

    monkeypatch.setattr(np, "save", half_save)
    with pytest.raises(OSError, match="killed"):
        _reports(tmp_path, np.full((2, 2), 0.5), {"final_average": 0.5})
    np.testing.assert_array_equal(np.load(tmp_path / "R.npy"), before)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"final_average": 1.0}


def test_reports_that_fail_to_reach_the_disk_keep_the_previous_files(tmp_path, monkeypatch):
    """A write that fails at fsync (full disk, lost mount) keeps the previous metrics.json and R.npy, no temp."""
    before = np.eye(2)
    np.save(tmp_path / "R.npy", before)
    (tmp_path / "metrics.json").write_text(json.dumps({"final_average": 1.0}))

    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        _reports(tmp_path, np.full((2, 2), 0.5), {"final_average": 0.5})
    np.testing.assert_array_equal(np.load(tmp_path / "R.npy"), before)
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"final_average": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["R.npy", "metrics.json"]


@pytest.mark.parametrize("text", ["null", "[]", "3", '"state"'])
def test_a_state_file_that_is_json_but_no_object_is_a_state_error(tmp_path, text):
    (tmp_path / STATE_FILE).write_text(text)
    with pytest.raises(StateError, match=rf"{STATE_FILE}: not a run state .*start the run again"):
        load_state(tmp_path)


def _task_folders(run_dir, names):
    for name in names:
        folder = run_dir / "tasks" / name
        (folder / "modules").mkdir(parents=True)
        task = name.split("-", 1)[1]
        (folder / "record.json").write_text(json.dumps({"task_id": task, "series": {"loss.train": [1.0]}}))


def test_task_folders_are_listed_by_index_not_as_strings(tmp_path):
    """With 1000+ tasks, 1000-b sorts before 101-c as a string: task order is the number before the dash."""
    _task_folders(tmp_path, ["999-a", "1000-b", "101-c"])
    assert recorded_tasks(tmp_path) == ["c", "a", "b"]
    # the same task id twice (never in a run, but a listing must still pick by index): the first one
    (tmp_path / "tasks" / "1000-c" / "modules").mkdir(parents=True)
    assert task_dir(tmp_path, "c") == tmp_path / "tasks" / "101-c" / "modules"


def test_report_reads_task_records_in_task_order(tmp_path):
    """The loss and eta panels follow the records' order: by index, not 1000-b before 101-c."""
    _task_folders(tmp_path, ["999-a", "1000-b", "101-c"])
    (tmp_path / "config.yaml").write_text("name: x\ndata:\n  tasks: [c, a, b]\n")
    assert list(load_run(tmp_path).records) == ["c", "a", "b"]


def test_pseudo_figure_draws_no_fidelity_bar_where_the_task_has_none(tmp_path):
    """RNNLG/E2E tasks have no fidelity measure: no bar, not one of height 0 that reads as fidelity 0."""
    rows = [{"task": "b", "of": "a", "role": "", "yield": 0.9, "fidelity": 0.7, "real_fidelity": None,
             "kept": None, "requested": None},
            {"task": "b", "of": "e2e", "role": "", "yield": 0.8, "fidelity": None, "real_fidelity": None,
             "kept": None, "requested": None}]
    ax = plots.pseudo_figure(rows).axes[0]
    yields, fidelity = ax.containers
    assert [bar.get_height() for bar in yields] == pytest.approx([0.9, 0.8])
    heights = [bar.get_height() for bar in fidelity]
    assert heights[0] == pytest.approx(0.7)
    assert math.isnan(heights[1])


def test_pseudo_figure_without_any_fidelity_measure_does_not_name_fidelity(tmp_path):
    """A user's tasks (or RNNLG/E2E only) have no fidelity: the legend named a green bar that never appears."""
    rows = [{"task": "b", "of": of, "role": "", "yield": 0.9, "fidelity": None, "real_fidelity": None,
             "kept": 9, "requested": 10} for of in ("a", "c")]
    ax = plots.pseudo_figure(rows).axes[0]
    assert len(ax.containers) == 1  # the yield bars only
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["yield: well formed / generated"]
