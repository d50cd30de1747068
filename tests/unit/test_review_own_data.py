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


def test_data_show_with_a_config_counts_tokens_as_the_run_does(tmp_path, capsys):
    """`dmea data show TASK --config C` counted tokens with a 1000-token BPE of the task alone (mean 31, max 33
    for a user task of unicode fares) while `dmea run C` encodes with the tiny backbone's BPE of all its tasks
    and pretraining text (mean 77, max 90): a model.max_length chosen from it failed the run."""
    import re
    import statistics

    from dmea_dist.cli import main
    from dmea_dist.config import load_config
    from dmea_dist.data.formatting import Formatter
    from dmea_dist.run import load_tasks, tiny_tokenizer

    rows = [f'{{"context": "fare(from=\'Zürich\';to=\'Łódź\';price=\'{p} €\')", "answer": "Zürich to Łódź: {p} €."}}'
            for p in range(40, 80)]
    (tmp_path / "fares.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  tasks: [fares]\n  user_tasks:\n    fares: {{path: {tmp_path / 'fares.jsonl'}}}\n"
                      f"model:\n  tiny: {{vocab_size: 300, pretrain: {{heldout_tasks: 1}}}}\n", encoding="utf-8")
    assert main(["data", "show", "fares", "--config", str(config), "-n", "0"]) == 0
    out = capsys.readouterr().out
    parsed = load_config(config)
    tasks = load_tasks(parsed)
    fmt = Formatter(tiny_tokenizer(parsed, tasks), max_length=parsed.model.max_length)
    lengths = [len(fmt.lm_example(r["context"], r["question"], r["answer"][0], task_index=0).input_ids)
               for r in tasks[0].rows["train"]]
    assert "the run's tokenizer" in out, out
    shown = re.search(r"min (\d+)  mean ([\d.]+)  max (\d+)", out)
    assert shown and (int(shown[1]), float(shown[2]), int(shown[3])) == \
        (min(lengths), round(statistics.mean(lengths), 1), max(lengths)), out


def test_the_task_summary_line_does_not_give_the_least_yield_as_the_yield():
    """flights_b's line said "pseudo samples 24/24, yield 35%" where its three replayed tasks' samples were
    89%, 35% and 80% well formed: the lowest one, unnamed, read as the share of all of them."""
    from dmea_dist.progress import task_summary

    yields = {"flights_a": 8 / 9, "recipes_a": 8 / 23, "reverse": 0.8}
    metrics = {f"pseudo.{k}.{t}": v for t in yields for k, v in (("kept", 8.0), ("requested", 8.0))}
    metrics.update({f"pseudo.yield.{t}": y for t, y in yields.items()})
    record = {"task_id": "flights_b", "task_index": 3, "params": {}, "metrics": metrics}
    assert "pseudo samples 24/24, yield 68% (lowest recipes_a 35%)" in task_summary(record, [], n_tasks=6)


def test_model_summary_says_a_data_warning_in_one_line_and_shows_no_transformers_bars(tmp_path, capfd):
    """`dmea model summary` of a config with a truncated example printed Python's warning form (the library's
    file:line, `DataWarning:`, then its source line `return lambda tokenizer: check_lengths(...`) and
    transformers' "Loading weights" and "Writing model shards" bars: noise a user cannot act on."""
    from dmea_dist.cli import main

    rows = [f'{{"context": "item {i}", "answer": "answer {i}"}}' for i in range(30)]
    rows.append('{"context": "' + " ".join(f"w{i}" for i in range(200)) + '", "answer": "long"}')
    (tmp_path / "t.jsonl").write_text("\n".join(rows) + "\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  tasks: [t]\n  overlength: truncate\n  user_tasks:\n    t: {{path: {tmp_path / 't.jsonl'}}}\n"
                      f"model:\n  max_length: 64\n  tiny: {{n_layer: 1, n_embd: 16, n_head: 2, n_positions: 64, "
                      f"vocab_size: 300, pretrain: {{steps: 1, heldout_tasks: 1, batch_size: 2, seq_len: 16}}}}\n"
                      f"output_dir: {tmp_path / 'runs'}\n")
    for _ in range(2):  # the first pretrains and writes the cache; the second loads it
        assert main(["model", "summary", str(config)]) == 0
        out, err = capfd.readouterr()
        assert "tasks (1): t [" in out
        assert err.startswith("warning: task 't': 1 of") and len(err.strip().splitlines()) == 1, err
        assert "Loading weights" not in err and "Writing model shards" not in err, err


def test_a_comparison_of_runs_with_eval_every_keeps_the_final_score_of_each_task():
    """`dmea report RUN_DMEA RUN_ACM` of two runs with eval.every: 2: the comparison (README: "metrics, final
    scores per task, average over tasks seen") held final_average alone, though the last row of R, evaluated
    after the last task whatever eval.every is, has every task's final score."""
    import numpy as np

    from dmea_dist.evaluation.pages import comparison_section
    from dmea_dist.evaluation.run_data import RunData

    nan = np.nan

    def run(name, last):
        R = np.array([[nan] * 3, [1, 2, nan], last], dtype=float)
        return RunData(name=name, method=name, config_name="c", tasks=["a", "b", "c"], R=R,
                       metrics={"final_average": float(np.mean(last))})

    section = comparison_section([run("dmea", [3.0, 4.0, 5.0]), run("acm", [6.0, 7.0, 8.5])])
    tables = [p.table for p in section.panels if p.table and p.table[0][0] == "final score"]
    assert tables and tables[0][1] == [["t0 a", "3.0", "6.0"], ["t1 b", "4.0", "7.0"], ["t2 c", "5.0", "8.5"]]
    stopped = comparison_section([run("dmea", [3.0, 4.0, 5.0]), run("acm", [nan, nan, nan])])
    assert not [p for p in stopped.panels if p.table and p.table[0][0] == "final score"]  # not a row of NaN
