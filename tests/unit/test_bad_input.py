"""Bad input is refused early, as one line naming the file, row or key and the fix, and nothing is lost.

Every case runs the command a user runs (`dmea run ...`, `dmea generate ...`
through `dmea_dist.cli.main`) next to an earlier run, and asserts the exit
code 2, the message, that no file of the earlier run changed, and that no new
run directory, cache or MLflow database appeared. The MLflow-backed earlier
run is in tests/integration/test_bad_input_tracking.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dmea_dist.cli import main
from dmea_dist.config import config_from_dict, load_config
from dmea_dist.data.formatting import Formatter
from dmea_dist.data.lengths import check_lengths, measure_split
from dmea_dist.data.tokenizer import train_bpe_tokenizer
from dmea_dist.errors import DataError, DataWarning
from dmea_dist.modeling.io import ModuleFileError, load_path_modules, save_path_modules
from dmea_dist.modeling.model import DMEAModel
from dmea_dist.tracking import TrackingWarning, count_failures, failures_summary

SYNTH = "synth.travel.00"
GOOD_ROWS = [{"context": f"name[place {i}] area[north]", "answer": f"place {i} is in the north"} for i in range(20)]


# ------------------------------------------------------------------ an earlier run, hashed


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> SHA-256 of every file under root."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A working directory holding an earlier run's files; returns (root, snapshot before)."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "earlier-20250101-000000"
    (run / "tasks" / f"000-{SYNTH}" / "modules").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"tasks": [SYNTH]}}))
    (run / "state.json").write_text(json.dumps({"tasks": [SYNTH], "task_index": 0, "stage": "done"}))
    (run / "report.md").write_text("# earlier run\n")
    (run / "tasks" / f"000-{SYNTH}" / "modules" / "modules.safetensors").write_bytes(os.urandom(256))
    (tmp_path / "runs" / "_cache").mkdir()
    (tmp_path / "runs" / "_cache" / "kept.txt").write_text("a cached backbone\n")
    return tmp_path, snapshot(tmp_path)


def write_config(root: Path, tasks, *, data=None, **sections) -> Path:
    """A tiny run config (tracking to a database that does not exist yet, no pretraining)."""
    raw = {"name": "bad", "output_dir": str(root / "runs"),
           "data": {"tasks": tasks, "synth_sizes": [16, 4, 4], **(data or {})},
           "model": {"tiny": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 300,
                              "pretrain": {"corpus": "none"}}, "max_length": 64},
           "tracking": {"uri": f"sqlite:///{root}/mlflow.db"}}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def user_task(root: Path, name: str, file: str) -> dict:
    return {"user_tasks": {name: {"path": str(root / file)}}}


def refused(argv, capsys, root: Path, before: dict[str, str]) -> str:
    """Run `dmea argv`; assert exit 2, one error line, nothing changed or created; returns the line."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    after = snapshot(root)
    assert after == {**before, **{k: v for k, v in after.items() if k == "run.yaml" or k.startswith("data/")}}
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["_cache", "earlier-20250101-000000"]
    assert not (root / "mlflow.db").exists()
    return lines[0]


def write_rows(root: Path, name: str, rows) -> Path:
    path = root / "data" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------ data


def test_non_utf8_csv_names_file_line_offset_and_fix(workspace, capsys):
    root, before = workspace
    path = root / "data" / "mine.csv"
    path.parent.mkdir()
    text = "context,answer\n" + "".join(f"a{i},b{i}\n" for i in range(12)) + "caf\xe9,menu\n"
    path.write_bytes(text.encode("latin-1"))
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.csv"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    offset = text.encode("latin-1").index(b"\xe9")
    assert f"{path}:14: not UTF-8 (byte 0xe9 at byte offset {offset})" in line
    assert "re-encode the file as UTF-8" in line


def test_non_utf8_jsonl_names_line(workspace, capsys):
    root, before = workspace
    path = write_rows(root, "mine.jsonl", GOOD_ROWS)
    path.write_bytes(path.read_bytes() + b'{"context": "\xff", "answer": "x"}\n')
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.jsonl"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert f"{path}:21: not UTF-8 (byte 0xff" in line and "re-encode" in line


def test_non_utf8_corpus_file_names_file_and_line(tmp_path):
    from dmea_dist.data.corpora import load_corpus

    (tmp_path / "e2e").mkdir()
    (tmp_path / "e2e" / "devset.csv").write_bytes("mr,ref\nname[Caf\xe9],good\n".encode("latin-1"))
    (tmp_path / "e2e" / "testset_w_refs.csv").write_text("mr,ref\nname[A],good\n")
    with pytest.raises(DataError, match=r"devset\.csv:2: not UTF-8 \(byte 0xe9 at byte offset 15\); re-encode"):
        load_corpus("e2e", data_root=tmp_path)


def test_utf8_bom_is_accepted(tmp_path):
    from dmea_dist.data.user_tasks import read_task_file

    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfcontext,answer\nx,y\n")
    assert read_task_file(path)[0].context == "x"


@pytest.mark.parametrize("bad, message", [
    ({"context": 7, "answer": "x"}, "'context' must be a string, got int"),
    ({"context": ["a", "b"], "answer": "x"}, "'context' must be a string, got list"),
    ({"context": "c", "question": 3.5, "answer": "x"}, "'question' must be a string, got float"),
    ({"context": "c", "answer": [1, 2]}, "'answer' must be a string or a list of strings, got [1, 2]"),
    ({"context": "c"}, "missing key 'answer'"),
    ({"context": "c", "answer": ""}, "'answer' is empty; give at least one non-empty reference"),
    ({"context": "c", "answer": []}, "'answer' is empty"),
    ({"context": "c", "answer": None}, "'answer' must be a string or a list of strings, got None"),
])
def test_wrongly_typed_or_missing_column_names_file_row_column(workspace, capsys, bad, message):
    root, before = workspace
    path = write_rows(root, "mine.jsonl", [*GOOD_ROWS[:5], bad, *GOOD_ROWS[5:]])
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.jsonl"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert f"{path}:6: {message}" in line


def test_wrongly_typed_parquet_column_names_row(workspace, capsys):
    root, before = workspace
    (root / "data").mkdir()
    path = root / "data" / "mine.parquet"
    pq.write_table(pa.table({"context": [1, 2, 3], "answer": ["a", "b", "c"]}), path)
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.parquet"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert f"{path} row 0 (0-based): 'context' must be a string, got int" in line


def test_split_too_small_to_split(workspace, capsys):
    root, before = workspace
    write_rows(root, "mine.jsonl", GOOD_ROWS[:4])
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.jsonl"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert "4 distinct inputs give an empty 'validation' split" in line and "add rows or raise that ratio" in line


def test_empty_split_file(workspace, capsys):
    root, before = workspace
    for split in ("train", "validation"):
        write_rows(root, f"{split}.jsonl", GOOD_ROWS)
    (root / "data" / "test.jsonl").write_text("\n")
    spec = {split: str(root / "data" / f"{split}.jsonl") for split in ("train", "validation", "test")}
    config = write_config(root, ["mine"], data={"user_tasks": {"mine": spec}})
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert f"{root / 'data' / 'test.jsonl'}: no data rows" in line


def test_unknown_task(workspace, capsys):
    root, before = workspace
    line = refused(["run", str(write_config(root, [SYNTH, "rnnlg.hotle"])), "--in-process"], capsys, root, before)
    assert "unknown task 'rnnlg.hotle' (did you mean 'rnnlg.hotel'?)" in line


def test_missing_data_root_names_the_key_not_an_env_var(workspace, capsys):
    root, before = workspace
    config = write_config(root, [SYNTH, "e2e"], data={"root": "no/such/folder"})
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert f"data root 'no/such/folder' (= {root / 'no/such/folder'}) does not exist" in line
    assert "task 'e2e'" in line and "--set data.root=DIR" in line and "DMEA_DATA_ROOT" not in line


def test_data_commands_read_the_configs_data_root(workspace, capsys):
    root, _ = workspace
    config = write_config(root, [SYNTH], data={"root": "elsewhere"})
    assert main(["data", "list", "--config", str(config)]) == 0
    assert f"data root: elsewhere (= {root / 'elsewhere'}, not found)" in capsys.readouterr().out
    assert main(["data", "show", "e2e", "--config", str(config)]) == 2
    assert "data root 'elsewhere'" in capsys.readouterr().err


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1e-3", "unknown key 'train.lrr'; did you mean 'train.lr'?"),
    ("train.batch_size=many", "train.batch_size must be int, got 'many'"),
    ("model.tiny.pretrain.lr=2.0", "model.tiny.pretrain.lr=2.0 is out of range; accepted: 1e-08 <= lr <= 1.0"),
    ("model.tiny.pretrain.lr=.nan", "model.tiny.pretrain.lr=nan is out of range"),
    ("deepspeed.optimizer.params.lr='1e-4'",
     "deepspeed.optimizer.params.lr='1e-4' is a string, DeepSpeed needs a number; write it without quotes"),
    ("data.overlength=cut", "data.overlength='cut' is not accepted"),
])
def test_bad_config_value_names_the_key(workspace, capsys, override, message):
    root, before = workspace
    config = write_config(root, [SYNTH])
    line = refused(["run", str(config), "--in-process", "--set", override], capsys, root, before)
    assert message in line and str(config) in line


def test_yaml_exponent_numbers_are_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {tasks: [synth.travel.00]}\ntrain: {lr: 5e-5}\nmodel: {tiny: {pretrain: {steps: 1e3}}}\n"
                    "deepspeed:\n  optimizer: {params: {lr: 1e-4, betas: [0.9, 0.999]}}\n"
                    "  zero_optimization: {reduce_bucket_size: 5e8, stage: 2}\n")
    config = load_config(path, ["deepspeed.optimizer.params.eps=1e-8"])
    assert config.train.lr == 5e-5 and config.model.tiny.pretrain.steps == 1000
    params = config.deepspeed["optimizer"]["params"]
    assert params == {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8}
    assert config.deepspeed["zero_optimization"]["reduce_bucket_size"] == 5e8


def test_max_length_beyond_positions_fails_before_pretraining(workspace, capsys):
    root, before = workspace
    config = write_config(root, [SYNTH], model={"max_length": 100,
                                                "tiny": {"n_positions": 64, "pretrain": {"corpus": "heldout_synth"}}})
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    assert "model.max_length=100 is longer than the model's 64 positions (model.tiny.n_positions)" in line
    assert "set model.max_length <= 64" in line


# ------------------------------------------------------------------ lengths


def test_overlength_input_fails_before_training_naming_task_split_row(workspace, capsys):
    root, before = workspace
    long_row = {"context": " ".join(f"word{i}" for i in range(80)), "answer": "short"}
    write_rows(root, "mine.jsonl", [*GOOD_ROWS, long_row])
    config = write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.jsonl"))
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    # the row by its place in the file (line 21), as every other bad-row error names it
    assert f"{root / 'data' / 'mine.jsonl'}:21: task 'mine', split " in line
    assert "tokens, longer than model.max_length=64" in line
    assert "shorten these inputs" in line and "data.overlength: truncate" in line


LONG = " ".join(f"word{i}" for i in range(80))


def _csv_file(path: Path) -> None:
    """A header, a quoted answer over two lines, a blank line, an emptied spreadsheet row: the long input is on
    line 26 of the file, and 22nd of the rows."""
    rows = [f"{r['context']},{r['answer']}" for r in GOOD_ROWS]
    lines = ["context,answer", *rows[:3], 'name[x] area[y],"x is\nin y"', "", *rows[3:18], ",", *rows[18:], f"{LONG},short"]
    path.write_text("\n".join(lines) + "\n")


def _jsonl_file(path: Path) -> None:
    """Blank lines between rows, the long input twice (merged into one input on loading): its first line is 24."""
    lines = [json.dumps(r) for r in GOOD_ROWS[:10]] + ["", "  "] + [json.dumps(r) for r in GOOD_ROWS[10:]]
    lines += ["", json.dumps({"context": LONG, "answer": "short"}), json.dumps({"context": LONG, "answer": "other"})]
    path.write_text("\n".join(lines) + "\n")


def _parquet_file(path: Path) -> None:
    contexts = [r["context"] for r in GOOD_ROWS]
    contexts.insert(7, LONG)
    pq.write_table(pa.table({"context": contexts, "answer": ["a"] * len(contexts)}), path)


@pytest.mark.parametrize("name, write, place", [
    ("mine.csv", _csv_file, ":26"), ("mine.jsonl", _jsonl_file, ":24"), ("mine.parquet", _parquet_file, " row 7 (0-based)"),
])
@pytest.mark.parametrize("layout", ["one file", "per-split files"])
def test_an_overlength_row_of_a_user_file_is_named_by_its_file_and_line(workspace, capsys, name, write, place, layout):
    """The error named the row's index as loaded (inputs merged, one file shuffled into splits): no line of the
    file. It names the file and line an editor shows, as the other errors about a row of these files do."""
    root, before = workspace
    (root / "data").mkdir()
    path = root / "data" / name
    write(path)
    if layout == "one file":
        spec = user_task(root, "mine", f"data/{name}")
    else:  # the long row in the test split's file; train and validation plain
        plain = write_rows(root, "plain.jsonl", GOOD_ROWS)
        spec = {"user_tasks": {"mine": {"train": str(plain), "validation": str(plain), "test": str(path)}}}
    config = write_config(root, ["mine"], data=spec)
    line = refused(["run", str(config), "--in-process"], capsys, root, before)
    split = "'test'" if layout == "per-split files" else "'"
    assert f"error: {path}{place}: task 'mine', split {split}" in line, line
    assert "tokens, longer than model.max_length=64" in line and "as loaded" not in line


def _tokenizer():
    texts = [f"name[place {i}] area[north] place {i} is in the north" for i in range(50)]
    return train_bpe_tokenizer(texts, vocab_size=300, max_tasks=2)


def test_measure_split_counts_what_the_formatter_cuts_and_merges():
    formatter = Formatter(_tokenizer(), max_length=24)
    base = " ".join(["area[north]"] * 12)
    rows = [{"context": f"{base} name[{i}]", "question": "", "answer": ["x"]} for i in range(3)]
    rows.append({"context": "name[short]", "question": "", "answer": ["x"]})
    measured = measure_split(formatter, rows, split="train", references="first")
    assert [index for index, _ in measured.over] == [0, 1, 2] and measured.examples == 4
    assert measured.collapsed == 3  # three inputs differing only at their end became one prompt
    ids = lambda text: formatter.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [tokens for _, tokens in measured.over] == [3 + len(ids(r["context"])) + len(ids(" x")) for r in rows[:3]]
    # what the formatter really encodes: the three became one example
    assert len({tuple(formatter.lm_example(r["context"], "", "x", task_index=0).input_ids) for r in rows[:3]}) == 1
    test = measure_split(formatter, rows, split="test", references="first")
    assert [i for i, _ in test.over] == [0, 1, 2] and test.collapsed == 3


def test_measure_split_counts_merges_of_an_input_cut_only_with_a_long_answer():
    # an input's cut depends on its answer: X fits whole with a short answer, but a long answer (a repeated
    # RNNLG input's other row, or another reference with references="all") cuts it to the prompt Y is cut to
    formatter = Formatter(_tokenizer(), max_length=24)
    base = " ".join(["area[north]"] * 3)
    x, y, long = f"{base} name[0]", f"{base} name[1]", " ".join(["the north"] * 3)
    lm = lambda context, answer: tuple(formatter.lm_example(context, "", answer, task_index=0).input_ids)  # noqa: E731
    assert lm(x, long) == lm(y, long)  # the formatter merges them
    repeated = [{"context": x, "question": "", "answer": ["x"]}, {"context": x, "question": "", "answer": [long]},
                {"context": y, "question": "", "answer": [long]}]
    measured = measure_split(formatter, repeated, split="train", references="first")
    assert [index for index, _ in measured.over] == [1, 2] and measured.collapsed == 2  # row 0 fits whole
    both = [{"context": x, "question": "", "answer": ["x", long]}, {"context": y, "question": "", "answer": [long]}]
    assert measure_split(formatter, both, split="train", references="all").collapsed == 2
    assert measure_split(formatter, both, split="train", references="first").collapsed == 0  # x is never cut


def test_overlength_truncate_warns_once_per_task_with_counts():
    formatter = Formatter(_tokenizer(), max_length=24)
    base = " ".join(["area[north]"] * 12)
    long = [{"context": f"{base} name[{i}]", "question": "", "answer": ["x"]} for i in range(2)]
    fine = [{"context": "name[a]", "question": "", "answer": ["x"]}]
    tasks = [("t1", {"train": long, "validation": fine, "test": fine}),
             ("t2", {"train": fine, "validation": fine, "test": fine})]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        check_lengths(formatter, tasks, train_references="first", overlength="truncate", positions=64)
    assert [str(w.message) for w in said if w.category is DataWarning] == [
        "task 't1': 2 of 4 examples are longer than model.max_length=24 and are truncated "
        "(data.overlength: truncate); after truncation 2 distinct inputs share their prompt with another input, "
        "so the model cannot tell them apart"]
    with pytest.raises(DataError, match=r"task 't1', split 'train', row 0 \(0-based, as loaded\), input "
                                         r"'area\[north\] area\[north\] .{36}\.\.\.': \d+ tokens, longer than "
                                         r"model.max_length=24 \(examples too long per task: t1 2\); raise "
                                         r"model.max_length \(up to the model's 64 positions\), or set "
                                         r"data.overlength: truncate"):
        check_lengths(formatter, tasks, train_references="first", overlength="error", positions=64)


def test_truncate_is_said_by_dmea_run_before_any_work(workspace, capsys):
    root, _ = workspace
    long_row = {"context": " ".join(f"word{i}" for i in range(80)), "answer": "short"}
    write_rows(root, "mine.jsonl", [*GOOD_ROWS, long_row])
    config = write_config(root, ["mine"], data={**user_task(root, "mine", "data/mine.jsonl"), "overlength": "truncate"},
                          tracking={"enabled": False})
    from dmea_dist.preflight import check_input

    check_input(load_config(config))
    err = capsys.readouterr().err
    assert err.count("warning: task 'mine': 1 of ") == 1 and "truncated" in err


def test_a_first_run_says_that_it_pretrains_the_backbone_and_a_second_does_not(workspace, capfd):
    root, _ = workspace
    write_rows(root, "mine.jsonl", GOOD_ROWS)
    tiny = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 300,
            "pretrain": {"steps": 20, "batch_size": 4, "seq_len": 32, "heldout_tasks": 1}}
    config = load_config(write_config(root, ["mine"], data=user_task(root, "mine", "data/mine.jsonl"),
                                      tracking={"enabled": False}, model={"tiny": tiny, "max_length": 64}))
    import logging

    from transformers.utils import logging as transformers_logging

    from dmea_dist.preflight import check_input

    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    transformers_logging.get_logger("transformers").addHandler(handler)
    transformers_logging.warning_once.cache_clear()  # said once per process: say it again if it would
    try:
        check_input(config)
    finally:
        transformers_logging.get_logger("transformers").removeHandler(handler)
    err = capfd.readouterr().err
    assert "pretraining the tiny backbone" in err and "backbone pretrained in" in err, err
    assert "Writing model shards" not in err  # no progress bar for writing one small file
    assert not [m for m in said if "loss_type" in m], said  # transformers' warning about GPT2LMHeadModel's loss
    check_input(config)  # cached now
    assert "pretrain" not in capfd.readouterr().err


# ------------------------------------------------------------------ module files and `dmea generate`


@pytest.fixture
def served_run(tmp_path, monkeypatch):
    """A real run directory with one recorded task (tiny backbone, untrained modules) and one unfinished."""
    from dmea_dist.run import build_run

    monkeypatch.chdir(tmp_path)
    raw = yaml.safe_load(write_config(tmp_path, [SYNTH, "synth.travel.01"]).read_text())
    raw["tracking"] = {"enabled": False}
    raw["data"]["overlength"] = "truncate"  # a few synth.travel rows pass 64 tokens with this tiny BPE
    run = build_run(config_from_dict(raw), run_dir=tmp_path / "run")
    model = run.model
    model.set_path(SYNTH, model.add_modules(generator=torch.Generator().manual_seed(0)))
    save_path_modules(model, SYNTH, run.run_dir / "tasks" / f"000-{SYNTH}" / "modules")
    (run.run_dir / "tasks" / "001-synth.travel.01" / "pseudo_samples").mkdir(parents=True)
    (run.run_dir / "state.json").write_text(json.dumps({
        "format": "dmea-run-state", "version": 1, "tasks": [{"task_id": SYNTH}, {"task_id": "synth.travel.01"}],
        "task_index": 1, "stage": "adapt", "status": "running", "message": ""}))
    return run.run_dir


def generate(run_dir, task, capsys) -> tuple[int, str]:
    code = main(["generate", str(run_dir), task, "name[x] area[north]", "--max-new-tokens", "4"])
    return code, capsys.readouterr().err


def test_generate_serves_a_recorded_task(served_run, capsys):
    code, err = generate(served_run, SYNTH, capsys)
    assert code == 0, err


def test_bit_flipped_module_file_is_refused(served_run, capsys):
    weights = served_run / "tasks" / f"000-{SYNTH}" / "modules" / "modules.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x10  # one bit of one float: safetensors loads it fine
    weights.write_bytes(bytes(data))
    before = snapshot(served_run)
    code, err = generate(served_run, SYNTH, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"error: {weights}: damaged, its SHA-256 differs from the one its manifest.json recorded" in err
    assert "restore the folder from the task's MLflow run" in err
    assert snapshot(served_run) == before


def test_truncated_module_file_is_refused(served_run, capsys):
    modules = served_run / "tasks" / f"000-{SYNTH}" / "modules"
    weights = modules / "modules.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    manifest = json.loads((modules / "manifest.json").read_text())
    del manifest["weights_sha256"]  # as written before checksums: safetensors must say it
    (modules / "manifest.json").write_text(json.dumps(manifest))
    code, err = generate(served_run, SYNTH, capsys)
    assert code == 2 and "Traceback" not in err
    assert f"error: {weights}: not a readable safetensors file" in err and "truncated, damaged" in err


def test_old_manifest_without_checksum_still_loads(tmp_path, tiny_gpt2_config):
    model = DMEAModel.from_config(tiny_gpt2_config)
    model.set_path("t", model.add_modules())
    save_path_modules(model, "t", tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert len(manifest.pop("weights_sha256")) == 64
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    assert load_path_modules(DMEAModel.from_config(tiny_gpt2_config), tmp_path / "m") == "t"
    assert not list((tmp_path / "m").glob(".*tmp"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("manifest, weights, message", [
    (None, b"\x00" * 64, "not a readable safetensors file"),                      # random file, old manifest
    ('["a", "list"]', None, "not a dmea module manifest (format 'list'"),
    ('{"format": "something-else"}', None, "not a dmea module manifest (format 'something-else'"),
    ("not json at all", None, "not a dmea module manifest (not valid JSON"),
])
def test_foreign_module_files_are_refused(tmp_path, tiny_gpt2_config, manifest, weights, message):
    model = DMEAModel.from_config(tiny_gpt2_config)
    model.set_path("t", model.add_modules())
    save_path_modules(model, "t", tmp_path / "m")
    if manifest is None:
        data = json.loads((tmp_path / "m" / "manifest.json").read_text())
        del data["weights_sha256"]
        manifest = json.dumps(data)
    (tmp_path / "m" / "manifest.json").write_text(manifest)
    if weights is not None:
        (tmp_path / "m" / "modules.safetensors").write_bytes(weights)
    with pytest.raises(ModuleFileError) as err:
        load_path_modules(DMEAModel.from_config(tiny_gpt2_config), tmp_path / "m")
    assert message in str(err.value) and str(tmp_path / "m") in str(err.value)


def test_module_file_of_another_model_shape_is_refused(tmp_path, tiny_gpt2_config):
    model = DMEAModel.from_config(tiny_gpt2_config, bottleneck=4)
    model.set_path("t", model.add_modules())
    save_path_modules(model, "t", tmp_path / "m")
    tiny_gpt2_config.n_embd = 48
    other = DMEAModel.from_config(tiny_gpt2_config, bottleneck=4)
    with pytest.raises(ModuleFileError, match=r"manifest\.json: d_model is 32 but the model has 48: these modules "
                                              r"were saved for a model with n_layer=3, d_model=32, bottleneck=4; "
                                              r"load them into a model of that shape"):
        load_path_modules(other, tmp_path / "m")


def test_generate_for_an_unfinished_task_says_where_its_run_stopped(served_run, capsys):
    code, err = generate(served_run, "synth.travel.01", capsys)
    assert code == 2 and "Traceback" not in err
    assert (f"error: task 'synth.travel.01' of {served_run} was not finished: its run stopped at the adapt stage "
            f"of task 2/2 (synth.travel.01), before recording it; finish the run with `dmea resume {served_run}`"
            ) in err
    assert f"recorded tasks: ['{SYNTH}']" in err


def test_generate_for_a_task_the_run_never_had(served_run, capsys):
    code, err = generate(served_run, "synth.travel.07", capsys)
    assert code == 2 and f"{served_run} has no task 'synth.travel.07'; recorded tasks: ['{SYNTH}']" in err


def test_generate_needs_a_run_directory(tmp_path, capsys):
    (tmp_path / "some.txt").write_text("not a run\n")
    code, err = generate(tmp_path, SYNTH, capsys)
    assert code == 2 and f"error: {tmp_path} is not a run directory (no config.yaml)" in err
    code, err = generate(tmp_path / "nowhere", SYNTH, capsys)
    assert code == 2 and f"error: {tmp_path / 'nowhere'} does not exist" in err


def test_generate_refuses_an_input_longer_than_the_run_allows(served_run, capsys):
    code = main(["generate", str(served_run), SYNTH, " ".join(f"word{i}" for i in range(200))])
    err = capsys.readouterr().err
    assert code == 2 and "longer than this run's model.max_length=64; shorten it" in err


# ------------------------------------------------------------------ tracking


def test_corrupt_mlflow_database_is_refused_before_any_work(workspace, capsys):
    root, _ = workspace
    (root / "mlflow.db").write_bytes(os.urandom(4096))
    before = snapshot(root)
    code = main(["run", str(write_config(root, [SYNTH])), "--in-process"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    db = root / "mlflow.db"
    assert f"error: {db}: the MLflow database is damaged or not a database (file is not a database)" in err
    assert f"move {db} away" in err and "tracking.uri" in err and "tracking.enabled=false" in err
    assert {k: v for k, v in snapshot(root).items() if k != "run.yaml"} == before
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["_cache", "earlier-20250101-000000"]


def test_tracking_failures_are_counted_and_summarised():
    with count_failures() as failures:
        for _ in range(3):  # the same warning from the same line: Python would show it once
            warnings.warn("MLflow tracking: logging metrics of task 1 (x) failed (boom)", TrackingWarning, stacklevel=1)
        warnings.warn("not about tracking", UserWarning, stacklevel=1)
    assert len(failures) == 3
    summary = failures_summary(failures, uri="sqlite:///m.db")
    assert summary.startswith("tracking: 3 MLflow call(s) failed during this run, so its record at sqlite:///m.db "
                              "is incomplete (the run directory has every result); first: logging metrics")
    assert summary.endswith("`dmea resume RUN_DIR` (the run directory above) records the tasks whose record failed")
    assert failures_summary([], uri="x") == ""


def test_generate_inputs_keep_a_line_separator_inside_a_json_string(tmp_path):
    """A JSONL input whose text holds U+2028 is one input, not a broken line (str.splitlines would split it)."""
    from dmea_dist.serving import read_inputs

    path = tmp_path / "inputs.jsonl"
    path.write_text('{"context": "name[a]\u2028food[b]", "task": "t"}\n"plain context"\n', encoding="utf-8")
    assert read_inputs(path) == [{"context": "name[a]\u2028food[b]", "task": "t"}, {"context": "plain context"}]


def test_backbone_cache_is_published_whole_or_not_at_all(tmp_path):
    """A run killed (here: failing) while it writes the backbone cache leaves no half cache that a later
    run would load; of two runs filling the same cache, the first one's stays and nothing is left over."""
    from dmea_dist.run import _publish

    cache = tmp_path / "_cache" / "backbone-0123"

    def dies_half_way(folder):
        (folder / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _publish(cache, dies_half_way)
    assert list((tmp_path / "_cache").iterdir()) == []

    _publish(cache, lambda folder: (folder / "model.safetensors").write_text("first"))
    _publish(cache, lambda folder: (folder / "model.safetensors").write_text("second"))  # lost the race
    assert (cache / "model.safetensors").read_text() == "first"
    assert [p.name for p in (tmp_path / "_cache").iterdir()] == ["backbone-0123"]


def test_backbone_does_not_depend_on_the_thread_count_of_the_process_that_pretrains_it(tmp_path):
    """Pretraining runs at a fixed thread count: a driver at two threads and a `--in-process` run at one make
    the same backbone (before, a run's result depended on which of them had filled the cache)."""
    import torch

    from dmea_dist.config import config_from_dict
    from dmea_dist.run import load_tasks, tiny_backbone, torch_threads

    config = config_from_dict({
        "name": "threads", "data": {"tasks": ["synth.restaurant.00"], "synth_sizes": [32, 8, 8]},
        "model": {"tiny": {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64, "vocab_size": 400,
                           "pretrain": {"steps": 12, "batch_size": 32, "seq_len": 64}}, "max_length": 64},
        "tracking": {"enabled": False}})
    tasks = load_tasks(config)
    backbones = []
    for threads in (1, 2):
        with torch_threads(threads):
            backbones.append(tiny_backbone(config, tasks, cache_root=tmp_path / str(threads))[1].state_dict())
    for name, tensor in backbones[0].items():
        assert torch.equal(backbones[1][name], tensor), name
