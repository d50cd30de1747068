"""The `dmea` command as a user runs it: data inspection and clean errors."""


from dmea_dist.cli import main


def test_data_show_real_corpora(data_root, capsys):
    assert main(["data", "show", "rnnlg.hotel", "--data-root", str(data_root), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "3223" in out and "1075" in out
    assert "<|ans|>" in out and "tokens per LM example" in out
    assert main(["data", "show", "e2e", "--data-root", str(data_root), "-n", "1"]) == 0
    assert "630" in capsys.readouterr().out  # distinct test MRs


def test_data_show_generated_task(capsys):
    assert main(["data", "show", "synth.travel.03", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "task synth.travel.03" in out and out.count("formatted:") == 2


def test_data_list_names_every_kind(capsys, tmp_path):
    assert main(["data", "list", "--data-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "rnnlg.hotel" in out and "files not found" in out and "synth.listops.<index>" in out


def test_malformed_user_row_fails_with_file_and_line(tmp_path, capsys):
    bad = tmp_path / "mytask.jsonl"
    bad.write_text('{"context": "a", "question": "", "answer": "b"}\n{"context": "c", "answer": }\n')
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  tasks: [mytask]\n  user_tasks:\n    mytask: {{path: {bad}}}\n")
    assert main(["data", "show", "mytask", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "invalid JSON" in err


def test_unknown_task_and_bad_config_are_one_line_errors(tmp_path, capsys):
    assert main(["data", "show", "rnnlg.hotle"]) == 2
    assert "rnnlg.hotel" in capsys.readouterr().err  # the suggestion
    config = tmp_path / "run.yaml"
    config.write_text("data:\n  tasks: [synth.travel.00]\ntrain:\n  lr: fast\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and str(config) in err and "Traceback" not in err


def test_generate_needs_a_run_directory(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "synth.travel.00", "inform(name='x')"]) == 2
    assert "not a run directory" in capsys.readouterr().err
