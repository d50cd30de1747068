"""A run interrupted as runs are (Ctrl-C, SIGTERM, a second command on the same run) ends in a state a user can
read and resume: MLflow never left RUNNING, one clear line, nothing started or written for a refused command."""

from __future__ import annotations

import numpy as np
import pytest

from dmea_dist.config import config_from_dict
from dmea_dist.driver import run_sequence


class _Tracker:
    active, parent_run_id = True, "parent"

    def __init__(self, ends=None, **kwargs):
        self.ends = ends

    def resume_sequence(self, run_id):
        return run_id

    def log_sequence_metrics(self, metrics, artifacts=None):
        pass

    def finish_sequence(self, status="FINISHED"):
        self.ends.append(status)


class _Done:
    """A coordinator whose every stage has finished: the driver has only the results left to write."""

    def tracking(self):
        return {"parent": "parent", "tasks": {"synth.hotel.00": "task-run"}}

    def records(self):
        return []

    def state_position(self):
        return {"done": True, "next": None}

    def results(self):
        return {"R": np.array([[50.0]]), "similarity": np.full((1, 1), np.nan), "baseline": None, "paths": None,
                "history": []}

    def mark(self, status, message):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("interruption, status, said", [
    (KeyboardInterrupt(), "KILLED", "stopped"),  # Ctrl-C while the report is drawn (1-2 s at the quick start's end)
    (SystemExit(15), "KILLED", "stopped"),  # SIGTERM, as Ray's driver handler raises it
    (RuntimeError("disk full"), "FAILED", "failed"),
])
def test_a_stop_while_the_results_are_written_ends_the_parent_run_and_says_how_to_finish(
        tmp_path, monkeypatch, capsys, interruption, status, said):
    """Every stage is done and the driver writes R, the report and the sequence metrics: a Ctrl-C there left the
    MLflow parent run RUNNING and the command ended without a word (exit 130)."""
    import dmea_dist.driver as driver
    import dmea_dist.tracking

    ends = []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", lambda **kwargs: _Tracker(ends))

    def interrupted(*args, **kwargs):
        raise interruption

    monkeypatch.setattr(driver, "write_reports", interrupted)
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run_dir = tmp_path / "run"
    with pytest.raises(type(interruption)):
        run_sequence(config, run_dir=run_dir, coordinator_factory=lambda *a, **k: _Done(), progress=False,
                     check=False)
    assert ends == [status]
    out = capsys.readouterr().out
    assert f"{said} while writing the results of {run_dir}" in out
    assert f"dmea resume {run_dir}" in out


def _stopped_run(tmp_path):
    """A run directory as a stopped run leaves it: config.yaml and state.json at task 1's first stage."""
    import yaml

    from dmea_dist.state import RunState, save_state

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False},
                               "output_dir": str(tmp_path)})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    save_state(RunState.new(["synth.hotel.00"]), run_dir)
    return run_dir


@pytest.mark.parametrize("entry", ["dmea", "dmea --in-process", "ray job"])
def test_a_second_resume_of_a_running_run_is_refused_before_ray_starts_or_its_config_changes(
        tmp_path, monkeypatch, capsys, entry):
    """`dmea resume RUN` while a resume of RUN runs: it started an embedded Ray (12 s and two cores' worth on a
    2-core machine, beside the run), printed `resuming RUN at task ...`, rewrote the run's config.yaml with its
    --set, and only then was refused, suggesting a --run-dir that resume does not have."""
    import fcntl
    import importlib.util
    from pathlib import Path

    from dmea_dist import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started for a resume of a run that is running")

    if entry.startswith("dmea"):
        monkeypatch.setattr(cli, "_ray", no_ray)
        main = lambda argv: cli.main([*argv, *entry.split()[1:]])  # noqa: E731
    else:
        spec = importlib.util.spec_from_file_location("run_sequence_job", Path(__file__).parents[2] / "ray_jobs" /
                                                      "run_sequence.py")
        job = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(job)
        monkeypatch.setattr(job, "connect", no_ray)
        main = lambda argv: job.main(["--resume", *argv[1:]])  # noqa: E731
    run_dir = _stopped_run(tmp_path)
    config_before = (run_dir / "config.yaml").read_text()
    with open(run_dir / ".lock", "a+") as running:  # the running driver's lock: another open file, as another process's
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        running.write("dmea pid 4242\n")
        running.flush()
        assert main(["resume", str(run_dir), "--set", "ray.num_generation_actors=3"]) == 2
    out, err = capsys.readouterr()
    assert "resuming" not in out and "now records" not in out
    assert err == (f"error: {run_dir} is in use by dmea pid 4242, a `dmea run` or `dmea resume` of it still "
                   f"running; wait for it to end or stop it first\n")
    assert (run_dir / "config.yaml").read_text() == config_before


def test_the_run_lock_is_taken_again_by_the_process_that_holds_it_and_released_by_the_outermost(tmp_path):
    """`dmea resume` holds the lock from before Ray starts; the run it drives takes it again (reentrant), and once
    both are done another process may take it."""
    import fcntl

    from dmea_dist.preflight import run_lock

    with run_lock(tmp_path, resume=True):
        with run_lock(tmp_path):
            pass
        with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held after the inner one ended
    with open(tmp_path / ".lock") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_dmea_resume_says_its_note_on_other_ranks_once(tmp_path, monkeypatch, capsys):
    """`dmea resume RUN --set ray.num_train_workers=2` printed its note (not bit for bit from here on) twice: once
    when the command checked the --set, again when the resume read the config."""
    import dmea_dist.distributed.cluster as cluster
    import dmea_dist.driver as driver
    from dmea_dist import cli

    monkeypatch.setattr(cli, "_ray", lambda address, config: (config, None))  # Ray, as it sized the run: unneeded
    monkeypatch.setattr(cluster, "size_overrides", lambda before, after: [])
    monkeypatch.setattr(driver, "_drive", lambda *args, **kwargs: None)
    run_dir = _stopped_run(tmp_path)
    assert cli.main(["resume", str(run_dir), "--set", "ray.num_train_workers=2"]) == 0
    assert capsys.readouterr().err.count("note: resuming with ray.num_train_workers=2") == 1


def test_resume_on_other_ranks_says_the_adaptation_it_stopped_in_starts_again(tmp_path, capsys):
    """An adaptation's epoch checkpoint holds each rank's optimizer shard and generator, so a resume on another
    number of training ranks starts that adaptation from its first step: it did so without a word (the quick
    start stopped at step 10 of 30, resumed with ray.num_train_workers=2, showed `adapt 1/30`)."""
    import json

    from dmea_dist.method.lifecycle import Stage
    from dmea_dist.preflight import resume_config
    from dmea_dist.state import load_state, save_state

    run_dir = _stopped_run(tmp_path)
    state = load_state(run_dir)
    state.stage = Stage.ADAPT
    save_state(state, run_dir)
    checkpoint = run_dir / "tasks" / "000-synth.hotel.00" / "adapt_checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "adapt_progress.json").write_text(json.dumps({"format": "dmea-adapt-progress", "steps": 10}))
    resume_config(run_dir, ["ray.num_generation_actors=2"])  # the ranks as they were: it continues from step 10
    assert "starts again" not in capsys.readouterr().err
    resume_config(run_dir, ["ray.num_train_workers=2"])
    assert ("the adaptation the run stopped in starts again from its first step on 2 training rank(s): its "
            "checkpoint (step 10) is of 1") in capsys.readouterr().err
    resume_config(run_dir, ["ray.num_train_workers=2"], note=False)
    assert capsys.readouterr().err == ""


def test_a_run_written_before_a_config_key_existed_resumes_with_what_it_computed(tmp_path, capsys):
    """method.adaptation.pseudo_split (a520ff7) changed what DMEA's generation asks for; a run whose config.yaml
    predates it resumes with the split it started with ("all"), not the new default, and says so."""
    import yaml

    from dmea_dist.preflight import resume_config

    run_dir = _stopped_run(tmp_path)
    assert resume_config(run_dir, []).method.adaptation.pseudo_split == "by_use"  # written by this code: its own
    assert "written before" not in capsys.readouterr().err
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    del raw["method"]["adaptation"]["pseudo_split"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(raw))
    assert resume_config(run_dir, []).method.adaptation.pseudo_split == "all"
    assert "written before method.adaptation.pseudo_split existed: the run resumes with 'all'" in \
        capsys.readouterr().err
    assert resume_config(run_dir, [], note=False).method.adaptation.pseudo_split == "all"
    assert capsys.readouterr().err == ""


def test_a_run_stopped_by_ctrl_c_says_where_in_one_line_without_stopped_twice(capsys):
    from dmea_dist.driver import RunStopped, report_error

    assert report_error(RunStopped("stopped by Ctrl-C before stage evaluate of task 2/3 (synth.listops.00)")) == 130
    assert capsys.readouterr().err == "stopped by Ctrl-C before stage evaluate of task 2/3 (synth.listops.00)\n"


def test_a_refused_resume_names_what_may_change_as_the_keys_are_written(tmp_path):
    """The refusal listed `data.root*, output_dir*, tracking.uri*` (no such keys) and said `name` or
    `tracking.experiment` would change what the run computes."""
    from dmea_dist.errors import DmeaError
    from dmea_dist.preflight import resume_config

    run_dir = _stopped_run(tmp_path)
    with pytest.raises(DmeaError) as refused:
        resume_config(run_dir, ["tracking.experiment=other"])
    assert "refused for ['tracking.experiment']" in str(refused.value)
    assert "(ray.*, data.root, output_dir, tracking.uri)" in str(refused.value)
    assert "computes" not in str(refused.value)


def test_resume_of_a_folder_that_does_not_exist_says_so(tmp_path, monkeypatch, capsys):
    """A mistyped run directory was `has no config.yaml: not a run directory`, as if the folder were there."""
    from dmea_dist import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["resume", "runs/quickstart-20261207-083234-e28"]) == 2
    assert capsys.readouterr().err == (f"error: runs/quickstart-20261207-083234-e28 does not exist (in {tmp_path}); "
                                       f"pass the run directory `dmea run` printed\n")
    assert not (tmp_path / "runs").exists()


def test_the_report_of_a_run_whose_driver_was_killed_says_interrupted_not_running(tmp_path):
    """A SIGKILLed driver (or a crash, a closed terminal) leaves state.json at "running"; `dmea report` said
    `run status: running` for a run nothing runs. No driver holds its lock: "interrupted"."""
    import fcntl

    from dmea_dist.evaluation.pages import summary_lines
    from dmea_dist.evaluation.run_data import load_run

    run_dir = _stopped_run(tmp_path)  # state.json: status running, as a killed driver leaves it
    assert load_run(run_dir).status == "running"  # no lock file (a run from before it): as the state says
    (run_dir / ".lock").write_text("dmea pid 4242\n")
    run = load_run(run_dir)
    assert run.status == "interrupted"
    assert "run status: interrupted" in summary_lines(run)[0]
    with open(run_dir / ".lock", "a+") as driver:  # a driver running it
        fcntl.flock(driver, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert load_run(run_dir).status == "running"


def test_ctrl_c_pressed_again_and_again_still_ends_the_mlflow_run_and_says_how_to_resume(tmp_path, monkeypatch,
                                                                                         capsys, request):
    """A user hammering Ctrl-C: the second press stops at once, the third lands while the stop is recorded. It cut
    that short: the MLflow parent run stayed RUNNING, no `continue with: dmea resume` line, and Ray's shutdown
    printed a traceback (seen on the quick start, presses 0.05 s apart)."""
    import os
    import signal

    import dmea_dist.tracking

    # Python's own handler, whatever an earlier test left (Ray Train's fit installs one and keeps it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    ends, marks = [], []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", lambda **kwargs: _Tracker(ends))

    class Stepping(_Done):
        def state_position(self):
            return {"done": False, "next": (0, "adapt")}

        def step(self):
            raise KeyboardInterrupt  # the second Ctrl-C, mid-stage

        def mark(self, status, message):
            os.kill(os.getpid(), signal.SIGINT)  # the third, while the stop is recorded
            marks.append((status, message))

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_sequence(config, run_dir=run_dir, coordinator_factory=lambda *a, **k: Stepping(), progress=False,
                     check=False)
    assert marks == [("stopped", "stopped by Ctrl-C")] and ends == ["KILLED"]
    assert f"continue with: dmea resume {run_dir}" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C stops at once again after


def test_ctrl_c_after_the_grace_interrupts_again():
    import os
    import signal

    from dmea_dist.stops import ctrl_c_grace

    with ctrl_c_grace(seconds=60):
        os.kill(os.getpid(), signal.SIGINT)  # ignored
    with pytest.raises(KeyboardInterrupt), ctrl_c_grace(seconds=0):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(100):  # the handler runs between two bytecodes of the main thread
            pass


@pytest.fixture
def termination_handlers():
    """SIGTERM's and SIGHUP's handlers put back after the test: a run stopped by one keeps its own installed, to
    take a second for the same stop as the command exits."""
    import signal

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_sigterm_on_ray_stops_the_run_with_exit_status_143_not_rays_1(tmp_path, monkeypatch, capsys,
                                                                      termination_handlers):
    """`kill PID` of a `dmea run` on Ray: Ray's driver handler (sys.exit(15), set by ray.init) raised SystemExit in
    the middle of a `ray.get`, which Ray turned into SystemExit(1): the command exited 1, as if it had failed, after
    Ray's C++ handler printed `*** SIGTERM received ...` and a stack."""
    import os
    import signal
    import sys
    import time

    import dmea_dist.tracking

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init leaves
    ends, marks = [], []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", lambda **kwargs: _Tracker(ends))

    class OnRay(_Done):
        def state_position(self):
            return {"done": False, "next": (0, "adapt")}

        def step(self):  # a ray.get of the coordinator actor's step
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(10)
            except SystemExit:  # _raylet.pyx check_signals: UnexpectedSystemExit, raised again as sys.exit(1)
                raise SystemExit(1) from None

        def mark(self, status, message):
            marks.append((status, message))

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exited:
        run_sequence(config, run_dir=run_dir, coordinator_factory=lambda *a, **k: OnRay(), progress=False,
                     check=False)
    assert exited.value.code == 128 + signal.SIGTERM
    assert marks == [("stopped", "stopped by SIGTERM")] and ends == ["KILLED"]
    assert f"stopped: the state of {run_dir} is saved" in capsys.readouterr().out


HANGUP = """
import os, signal, sys, time

signal.signal(signal.SIGHUP, signal.SIG_DFL)  # started from a terminal, not under nohup (as a CI may run the suite)
sys.path.insert(0, sys.argv[1])
import dmea_dist.tracking
from dmea_dist.config import config_from_dict
from dmea_dist.driver import run_sequence
from tests.unit.test_interrupted_runs import _Done, _Tracker

ends = []
dmea_dist.tracking.Tracker = lambda **kwargs: _Tracker(ends)
terminal, tty = os.openpty()
os.dup2(tty, 1)  # stdout is the terminal, line-buffered as Python makes a terminal's; stderr a file the test reads
sys.stdout = open(1, "w", buffering=1, closefd=False)


class Hungup(_Done):
    def state_position(self):
        return {"done": False, "next": (0, "adapt")}

    def step(self):
        os.close(terminal)  # the terminal window closed: a write to it raises EIO
        os.kill(os.getpid(), signal.SIGHUP)  # and the shell sends SIGHUP to the job
        time.sleep(10)

    def mark(self, status, message):
        print(f"{status}: {message}", file=sys.stderr)


def on_exit():
    print(f"ended {ends}", file=sys.stderr)


import atexit

atexit.register(on_exit)
config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]}, "tracking": {"enabled": False}})
run_sequence(config, run_dir=sys.argv[2], coordinator_factory=lambda *a, **k: Hungup(), progress=False, check=False)
"""


def test_a_closed_terminal_stops_the_run_as_sigterm_does_and_exits_129(tmp_path):
    """The terminal closed (a window, an ssh connection dropped): SIGHUP's default killed the driver on the spot,
    with the state at "running" and the MLflow parent run RUNNING until a later resume, and no word. The terminal
    is gone by then: a write to it raises EIO, which must not cut the stop's record short or end in a traceback."""
    import subprocess
    import sys
    from pathlib import Path

    stderr = tmp_path / "stderr"
    with stderr.open("w") as err:
        done = subprocess.run([sys.executable, "-c", HANGUP, str(Path(__file__).parents[2]), str(tmp_path / "run")],
                              stdout=subprocess.DEVNULL, stderr=err, timeout=60)
    assert done.returncode == 129, stderr.read_text()
    assert stderr.read_text() == "stopped: stopped by SIGHUP\nended ['KILLED']\n"


def test_the_processes_an_embedded_ray_starts_outlive_a_closed_terminal(monkeypatch):
    """Ray's GCS, raylet and agents are in the driver's process group, to which the shell sends SIGHUP when the
    terminal closes: they died of it, and the driver could not mark the run stopped through its coordinator actor
    (Ray blocks SIGINT in them for Ctrl-C likewise). The driver itself still gets SIGHUP."""
    import signal
    import subprocess
    import sys

    from dmea_dist.distributed import cluster

    blocked = "import signal; print(signal.SIGHUP in signal.pthread_sigmask(signal.SIG_BLOCK, []))"
    started = []

    def init(**kwargs):  # what ray.init does here: start Ray's processes
        started.append(subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True).stdout.strip())
        return type("Context", (), {"dashboard_url": None})()

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster.connect(None) == "local"
    assert started == ["True"]
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, [])


def test_a_run_failed_by_our_error_on_ray_records_its_message_not_rays_traceback(tmp_path, monkeypatch):
    """Our error from the coordinator actor's step (a GPU rank whose torch sees no GPU) comes back as
    RayTaskError(ConfigError), whose str is Ray's traceback, with colour codes: the state's failure message held
    that, where the command's `error:` line says the error."""
    from ray.exceptions import RayTaskError

    import dmea_dist.tracking
    from dmea_dist.errors import ConfigError

    ends, marks = [], []
    monkeypatch.setattr(dmea_dist.tracking, "Tracker", lambda **kwargs: _Tracker(ends))
    ours = ConfigError("ray.use_gpu: a training rank on node 10.0.0.7 holds one of the GPUs Ray counts there")

    class OnRay(_Done):
        def state_position(self):
            return {"done": False, "next": (0, "adapt")}

        def step(self):
            raise RayTaskError("CoordinatorActor.call", "Traceback ...", ours).as_instanceof_cause()

        def mark(self, status, message):
            marks.append((status, message))

    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    with pytest.raises(ConfigError):
        run_sequence(config, run_dir=tmp_path / "run", coordinator_factory=lambda *a, **k: OnRay(), progress=False,
                     check=False)
    assert marks == [("failed", str(ours))] and ends == ["FAILED"]


KILLED_WHILE_PRETRAINING = """
import os, signal, sys, time
from pathlib import Path

signal.signal(signal.SIGTERM, signal.SIG_DFL)
sys.path.insert(0, sys.argv[1])
import dmea_dist.preflight
from dmea_dist.cli import main
from dmea_dist.run import _publish


def check_input(config):  # a cold run's pretraining, killed while it writes the backbone cache
    def write(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    _publish(Path(sys.argv[2]) / "_cache" / "backbone-0123", write)


dmea_dist.preflight.check_input = check_input
sys.exit(main(["run", "configs/quickstart.yaml", "--in-process", "--set", f"output_dir={sys.argv[2]}"]))
"""


def test_a_run_killed_before_it_is_driven_leaves_no_half_made_files(tmp_path):
    """SIGTERM (or SIGHUP) during a cold run's ~45 s of pretraining, before the driver's own handlers: the default
    action ended the process on the spot, leaving the backbone cache's private folder (half a model) behind in
    runs/_cache. Now the command exits by SystemExit(143), and the folder is removed on the way out."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", KILLED_WHILE_PRETRAINING, str(root), str(tmp_path)], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 143, done.stderr
    assert list((tmp_path / "_cache").iterdir()) == []


def test_the_commands_sigterm_handler_outlives_ray_init(monkeypatch):
    """ray.init replaced the command's SIGTERM handler (exit 143 through its cleanup) with Ray's (sys.exit(15)) and
    a C++ one that printed a stack, for the seconds before the run is driven. A process that set none (a Ray job's
    entry point) keeps Ray's."""
    import signal
    import sys

    from dmea_dist.distributed import cluster

    def rays(signum, frame):
        sys.exit(signum)

    def init(**kwargs):  # what ray.init does to SIGTERM in the driver
        signal.signal(signal.SIGTERM, rays)
        return type("Context", (), {"dashboard_url": None})()

    def commands(signum, frame):
        raise SystemExit(128 + signum)

    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", init)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, commands)
        cluster.connect(None)
        assert signal.getsignal(signal.SIGTERM) is commands
        cluster.connect("ray://head:10001")
        assert signal.getsignal(signal.SIGTERM) is commands
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        cluster.connect(None)
        assert signal.getsignal(signal.SIGTERM) is rays
    finally:
        signal.signal(signal.SIGTERM, before)
