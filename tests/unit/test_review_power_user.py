"""A power user's journeys past the README's basics: own checkpoints, partial evaluation, comparisons."""

from __future__ import annotations

import pytest

from dmea_dist.cli import main


def _checkpoint(folder, *, weights: bool = True, tokenizer: bool = True, extra_rows: int = 0):
    """A 1-layer GPT-2 and its byte-level tokenizer, saved with save_pretrained (what a user brings offline)."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=128, vocab_size=len(vocab) + extra_rows,
                        bos_token_id=len(vocab) - 1, eos_token_id=len(vocab) - 1)
    if weights:
        GPT2LMHeadModel(config).save_pretrained(folder)
    else:
        config.save_pretrained(folder)
    if tokenizer:
        GPT2Tokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("missing", ["weights", "tokenizer", "rows"])
def test_a_local_checkpoint_missing_a_part_is_one_error_line(tmp_path, capsys, missing):
    """model.pretrained pointing to a folder without its weights ended, on Ray, in the coordinator actor's
    OSError traceback after Ray had started; without its tokenizer files transformers 5 built an empty
    tokenizer and the run died in grow_vocabulary ('vocab_size 130 is smaller than the checkpoint's 400');
    a tokenizer smaller than the embeddings likewise. Each is now refused before anything starts."""
    folder = _checkpoint(tmp_path / "ckpt", weights=missing != "weights", tokenizer=missing != "tokenizer",
                         extra_rows=500 if missing == "rows" else 0)
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  tasks: [synth.travel.00]\n  synth_sizes: [8, 4, 4]\nmodel:\n  pretrained: {folder}\n"
                      f"  max_length: 128\ntracking:\n  enabled: false\noutput_dir: {tmp_path / 'runs'}\n")
    assert main(["run", str(config), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and str(folder) in err and "Traceback" not in err, err
    assert {"weights": "no weights", "tokenizer": "no vocabulary", "rows": "embedding rows"}[missing] in err, err
    assert not list((tmp_path / "runs").glob("*-*")), "no run directory for a run that never started"


# ------------------------------------------------------------------ eval.every > 1


def _run_data(name, R, metrics):
    import numpy as np

    from dmea_dist.evaluation.run_data import RunData

    return RunData(name=name, method="dmea", config_name="c", tasks=["a", "b", "c", "d"], R=np.array(R, dtype=float),
                   metrics=metrics)


def test_a_run_that_evaluated_every_second_task_says_why_bwt_is_missing():
    """With eval.every: 2 the run printed only final_average=..., metrics.json and the report's metrics table
    had no BWT or forgetting and nothing said why; a comparison with such a run silently dropped its figure."""
    import numpy as np

    from dmea_dist.evaluation import continual
    from dmea_dist.evaluation.pages import comparison_section, metrics_panel

    nan = np.nan
    every = [[nan] * 4, [1, 2, nan, nan], [nan] * 4, [3, 4, 5, 6]]
    full = [[1, nan, nan, nan], [1, 2, nan, nan], [1, 2, 3, nan], [3, 4, 5, 6]]
    why = continual.why_no_bwt(every)
    assert "R[0][0], R[2][2] were not evaluated" in why and "eval.every" in why, why
    assert continual.why_no_bwt(full) == ""
    assert continual.why_no_bwt([[nan, nan], [1, 2]]).count("R[") == 1  # the last task's own score is there

    table = metrics_panel(_run_data("r", every, {"final_average": 4.5})).table
    assert table is not None and any("bwt and forgetting not measured" in row[0] for row in table[1]), table
    full_table = metrics_panel(_run_data("f", full, {"final_average": 4.5, "bwt": 1.0, "forgetting": 0.0})).table
    assert all("not measured" not in row[0] for row in full_table[1])

    section = comparison_section([_run_data("f", full, {"final_average": 4.5}),
                                  _run_data("e", every, {"final_average": 4.5})])
    # since 9743693 the comparison draws its figure all the same (R's last row is complete; the average so far
    # where a row scored every seen task), beside a table of the final scores: nothing is dropped silently
    assert [p for p in section.panels if p.image is not None], section.panels
    assert any(p.table and p.table[0][0] == "final score" for p in section.panels), section.panels


def test_the_end_of_a_run_prints_why_bwt_is_missing(capsys):
    """The driver's last lines: after final_average=..., the reason bwt and forgetting are not there."""
    import numpy as np

    from dmea_dist import driver

    nan = np.nan
    R = np.array([[nan] * 3, [1, 2, nan], [3, 4, 5]], dtype=float)
    metrics = driver.sequence_metrics(R)
    assert set(metrics) == {"final_average"}
    lines = []
    driver.print_results(lines.append, ["a", "b", "c"], R, metrics, metric="rouge")
    assert any("bwt and forgetting not measured" in line and "eval.every > 1" in line for line in lines), lines
    # multitask trains once, at the end: its own reason, not eval.every's (as the report says)
    lines = []
    driver.print_results(lines.append, ["a", "b", "c"], R, metrics, metric="rouge", method="multitask")
    assert any("multitask trains once" in line for line in lines) and not any("eval.every" in line for line in lines)


# ------------------------------------------------------------------ dmea resume --set tracking.uri=...


def test_resume_into_a_store_without_the_run_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    """`dmea resume RUN --set tracking.uri=sqlite:///mlfow.db` (a typo, or the wrong copy) created an empty
    database and ran the rest of the sequence with every MLflow call failing ('Run with id=... not found'),
    said only in a warning at the end. The store must hold the run's parent run: checked before any work,
    and a sqlite file that does not exist is not created."""
    import dataclasses

    import yaml
    from mlflow import MlflowClient

    from dmea_dist.config import config_from_dict
    from dmea_dist.driver import resume_sequence
    from dmea_dist.errors import DmeaError
    from dmea_dist.state import RunState, save_state

    recorded = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=recorded)
    parent = client.create_run(client.create_experiment("dmea-dist")).info.run_id
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = config_from_dict({"data": {"tasks": ["synth.hotel.00"]},
                               "tracking": {"uri": recorded, "experiment": "dmea-dist"}})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    save_state(dataclasses.replace(RunState.new(["synth.hotel.00"]), mlflow_parent_run_id=parent), run_dir)
    other = tmp_path / "other.db"
    MlflowClient(tracking_uri=f"sqlite:///{other}").search_experiments()  # an MLflow store of other runs

    started = []

    def factory(config, run_dir, **kwargs):
        started.append(config.tracking.uri)
        raise RuntimeError("the coordinator was started")

    def resume(uri):
        return resume_sequence(run_dir, overrides=[f"tracking.uri={uri}"], coordinator_factory=factory,
                               progress=False, echo=lambda line: None)

    for uri in (f"sqlite:///{tmp_path / 'mlfow.db'}", f"sqlite:///{other}"):
        with pytest.raises(DmeaError, match=f"parent run {parent}.*{tmp_path / 'mlflow.db'}"):
            resume(uri)
    assert not started and not (tmp_path / "mlfow.db").exists()
    import dmea_dist.cli

    monkeypatch.setattr(dmea_dist.cli, "_ray", lambda *a, **k: started.append("ray") or pytest.fail("Ray started"))
    capsys.readouterr()  # MLflow's own lines from creating the stores above
    assert main(["resume", str(run_dir), "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlfow.db'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: tracking.uri") and len(err.splitlines()) == 1 and not started, err
    moved = tmp_path / "moved.db"  # the database moved: the run goes on there
    moved.write_bytes((tmp_path / "mlflow.db").read_bytes())
    with pytest.raises(RuntimeError, match="the coordinator was started"):
        resume(f"sqlite:///{moved}")
    assert started == [f"sqlite:///{moved}"]
