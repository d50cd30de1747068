"""Findings of a new user's walk through the README's journeys: each test shows one bug, fixed."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.unit.serving_case import two_task_run


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


def test_a_task_answers_alike_alone_and_beside_a_later_task_that_trained_its_module(tiny_gpt2_config, tmp_path,
                                                                                     monkeypatch):
    """README: a file may mix tasks and "the answers are those each task gives alone". The quick start's
    synth.restaurant.01 reuses and trains synth.restaurant.00's modules: a file with rows of both answered
    restaurant.00's rows with restaurant.01's weights of the shared modules (one shared backbone, the later
    folder loaded last), so its answer changed with the other rows of the file."""
    from dmea_dist import serving

    run_dir = two_task_run(tiny_gpt2_config, tmp_path, monkeypatch)[0]
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        alone = serving.load_task_model(run_dir, "a")
        expected_a = alone.models["a"](ids, path=alone.paths["a"]).logits
        alone = serving.load_task_model(run_dir, "b")
        expected_b = alone.models["b"](ids, path=alone.paths["b"]).logits
        for served in (serving.load_task_model(run_dir), serving.load_task_model(run_dir, "a", tasks=["b"]),
                       serving.load_task_model(run_dir, "b", tasks=["a"])):
            assert served.tasks == ["a", "b"]
            for task, expected in (("a", expected_a), ("b", expected_b)):
                got = served.models[task](ids, path=served.paths[task]).logits
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
        # latest=True (benchmarks/audit_pseudo_samples.py): the run's final model, a on b's shared module
        final = serving.load_task_model(run_dir, latest=True)
        assert final.models["a"] is final.models["b"]
        assert not torch.equal(final.models["a"](ids, path=final.paths["a"]).logits, expected_a)


def test_tasks_that_disagree_on_a_module_still_share_one_backbone(tiny_gpt2_config, tmp_path, monkeypatch):
    """Each task its recorded weights, on one backbone: the later task's version of the shared module is a copy
    in the pool under an id of its own (a module, not a backbone), and a third task that recorded the first
    version shares it."""
    from dmea_dist import serving

    run_dir = two_task_run(tiny_gpt2_config, tmp_path, monkeypatch)[0]
    shutil.copytree(run_dir / "tasks/000-a", run_dir / "tasks/002-a2")
    manifest = run_dir / "tasks/002-a2/modules/manifest.json"
    manifest.write_text(manifest.read_text().replace('"task_id": "a"', '"task_id": "a2"'))
    served = serving.load_task_model(run_dir)
    assert served.tasks == ["a", "b", "a2"]
    model = served.models["a"]
    assert served.models["b"] is model and served.models["a2"] is model
    a, b, a2 = served.paths["a"], served.paths["b"], served.paths["a2"]
    assert a[0] != b[0] and a2 == a  # b's layer-0 module is its own copy; a2 recorded a's weights: a's modules
    assert len(model.pools[0]) == 2  # a's module and b's version of it, nothing more


@pytest.mark.parametrize("finished", [True, False])
def test_resuming_a_finished_run_starts_no_ray(tmp_path, monkeypatch, finished):
    """`dmea resume` of a finished run started a whole local Ray (~10 s) only to print the results again; it
    has no stage left, so it runs in process. An unfinished run still goes to Ray."""
    import yaml

    from dmea_dist import cli, driver
    from dmea_dist.config import config_from_dict
    from dmea_dist.method.lifecycle import Stage
    from dmea_dist.state import RunState, save_state

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    state = RunState.new(["synth.hotel.00"])
    if finished:
        state.stage = Stage.DONE
    save_state(state, run_dir)
    calls = []
    monkeypatch.setattr(driver, "resume_sequence", lambda run_dir, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(cli, "_ray", lambda address, config: (config, "ray factory"))  # no Ray started here
    assert cli.main(["resume", str(run_dir)]) == 0
    assert calls[0]["coordinator_factory"] == (None if finished else "ray factory")
