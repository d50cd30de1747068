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
    notes = [p.note for p in section.panels if p.note]
    assert notes and "e did not evaluate every task" in notes[0], section.panels


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
    assert any("bwt and forgetting not measured" in line for line in lines), lines
