"""The config system as a user meets it: mistakes in a config file or a `--set` fail in one line naming the
file, the key and the fix; nothing is silently dropped or read as something else."""

import re

import pytest

from dmea_dist.config import load_config
from dmea_dist.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, key, line", [
    ("data:\n  tasks: [a]\ntrain:\n  lr: 0.1\ntrain:\n  batch_size: 2\n", "train", 3),  # the first lr was lost
    ("data:\n  tasks: [a]\ntrain:\n  lr: 0.1\n  lr: 0.2\n", "lr", 4),  # 0.2 was used, silently
])
def test_a_key_given_twice_is_refused_not_the_last_one_kept(tmp_path, text, key, line):
    with pytest.raises(ConfigError, match=rf"key '{key}' is given twice .*first on line {line}"):
        load_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"key 'lr' is given twice"):
        load_config(write(tmp_path, "data:\n  tasks: [a]\n"), ["train={lr: 0.1, lr: 0.2}"])


def test_a_merge_key_may_still_be_overridden():
    from dmea_dist.typed_yaml import parse_yaml

    assert parse_yaml("a: &b {lr: 0.1, batch_size: 2}\nc:\n  <<: *b\n  lr: 0.3\n")["c"] == {"lr": 0.3, "batch_size": 2}


@pytest.mark.parametrize("text, where, problem", [
    ("data:\n  tasks: [a]\ntrain:\n\tlr: 0.1\n", "line 4, column 1", "found character '\\t' that cannot start any token (indent with spaces, not tabs)"),
    ("data:\n  tasks: [a, b\n", "line 3, column 1", "expected ',' or ']'"),
])
def test_a_config_that_is_not_yaml_is_refused_in_one_line_with_its_line(tmp_path, text, where, problem):
    """The parser's multi-line excerpt ("in "<unicode string>", line 4 ...") followed `error:`."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "\n" not in message and "<unicode string>" not in message
    assert message.startswith(f"{path}, {where}: not valid YAML: ") and problem in message


@pytest.mark.parametrize("override, message", [
    # DeepSpeed ignores a top-level key it does not know: this trained at ZeRO 1 without a word
    ("deepspeed.zero_optimisation.stage=2",
     r"unknown key 'deepspeed.zero_optimisation'; did you mean 'deepspeed.zero_optimization'\? \(DeepSpeed would ignore"),
    # these failed at the first adaptation, after the first task's search, in a run no resume could mend
    ("deepspeed.zero_optimization.stagee=2", r"unknown key 'deepspeed.zero_optimization.stagee'; did you mean "
                                             r"'deepspeed.zero_optimization.stage'\?"),
    ("deepspeed.zero_optimization.stage=0", r"deepspeed.zero_optimization.stage=0 is not accepted: .*ZeRO stage 1, 2 or 3"),
    ("deepspeed.zero_optimization=true", r"deepspeed.zero_optimization must be a mapping, got True"),
    ("deepspeed.fp16.enabled=true", r"deepspeed.fp16.enabled is set: the gradient-scaled step runs in fp32"),
    ("deepspeed.gradient_accumulation_steps=2", r"deepspeed.gradient_accumulation_steps=2 is not accepted"),
])
def test_the_deepspeed_section_is_checked_when_the_config_loads(tmp_path, override, message):
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path, [override])
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_deepspeed_settings_the_engine_takes_still_load(tmp_path):
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    ok = ["deepspeed.zero_optimization={stage: 3, stage3_param_persistence_threshold: 0, overlap_comm: true}",
          "deepspeed.optimizer={type: AdamW, params: {lr: 1e-3, torch_adam: true}}", "deepspeed.bf16={enabled: false}",
          "deepspeed.gradient_accumulation_steps=1", "deepspeed.steps_per_print=100", "deepspeed.wall_clock_breakdown=true"]
    assert load_config(path, ok).deepspeed["zero_optimization"]["stage"] == 3


def test_the_deepspeed_key_lists_hold_every_key_the_installed_deepspeed_reads(monkeypatch):
    """The lists are DeepSpeed 0.19's; a DeepSpeed that reads another key would have it refused."""
    pytest.importorskip("deepspeed")
    import deepspeed.runtime.config as ds_config
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from dmea_dist.config import DEEPSPEED_KEYS, DEEPSPEED_ZERO_KEYS

    read = set()

    class Keys:
        def __init__(self, d):
            self.d = d

        def __contains__(self, key):
            read.add(key)
            return key in self.d

        def __iter__(self):
            return iter(self.d)

    class Recording(dict):  # records every top-level key DeepSpeedConfig asks for
        def get(self, key, *default):
            read.add(key)
            return super().get(key, *default)

        def __contains__(self, key):
            read.add(key)
            return super().__contains__(key)

        def __getitem__(self, key):
            read.add(key)
            return super().__getitem__(key)

        def keys(self):
            return Keys(dict(self))

        def __copy__(self):
            return self

        def __deepcopy__(self, memo):
            return self

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    DeepSpeedConfig(Recording(config))
    # with a process group DeepSpeed reads more (sequence_parallel_size): as after any engine this process built
    monkeypatch.setattr(ds_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_config.dist, "get_world_size", lambda *a, **k: 1)
    DeepSpeedConfig(Recording(config))
    assert "sequence_parallel_size" in read
    assert read - DEEPSPEED_KEYS == set()
    fields = DeepSpeedZeroConfig.model_fields
    assert set(fields) | {f.alias for f in fields.values() if f.alias} <= DEEPSPEED_ZERO_KEYS


def test_a_set_of_a_whole_section_may_not_drop_what_the_config_sets(tmp_path):
    """`--set train={lr: 1e-3}` replaced the file's train section: its batch_size: 2 silently went back to 4."""
    path = write(tmp_path, "data:\n  tasks: [a]\ntrain:\n  batch_size: 2\n  lr: 0.1\nmethod:\n  expansion: {epochs: 4}\n")
    with pytest.raises(ConfigError, match=r"--set train=\{lr: 0.001\} would replace the whole section, dropping "
                                          r"train.batch_size that the config sets; set the keys one at a time"):
        load_config(path, ["train={lr: 0.001}"])
    with pytest.raises(ConfigError, match=r"dropping method.expansion.epochs"):
        load_config(path, ["method={expansion: {beta: 0.2}}"])
    # what drops nothing is as before: a section the file lacks, one that keeps every key, a list set whole
    cfg = load_config(path, ["eval={top_k: 5}", "train={lr: 0.001, batch_size: 3}",
                             "method.expansion.candidates=[{}, {beta: 0.3}]"])
    assert (cfg.eval.top_k, cfg.train.lr, cfg.train.batch_size) == (5, 0.001, 3)


def test_a_section_written_empty_is_its_defaults(tmp_path):
    """`model:` with every key commented out is YAML's null: it failed as "model must be a mapping, got NoneType",
    and a --set into it as "'deepspeed' is a value, not a section", naming no file."""
    path = write(tmp_path, "data:\n  tasks: [a]\nmodel:\n  # max_length: 64\ndeepspeed:\n  # zero_optimization: {stage: 2}\n")
    cfg = load_config(path)
    assert cfg.model.max_length == 128 and cfg.deepspeed == {}
    cfg = load_config(path, ["deepspeed.zero_optimization.stage=2", "model.max_length=64"])
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}} and cfg.model.max_length == 64


def test_a_seed_torch_cannot_take_is_refused_when_the_config_loads(tmp_path):
    """train.seed=10**23 loaded, then `dmea model summary` and `dmea run` ended in torch's traceback."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=r"train.seed=100000000000000000000000 is out of range"):
        load_config(path, ["train.seed=100000000000000000000000"])
    assert load_config(path, ["train.seed=-1"]).train.seed == -1  # torch takes it, as before
    assert load_config(path, ["train.seed=20261207053115"]).train.seed == 20261207053115


@pytest.mark.parametrize("value, read_as", [("010", "an octal number to YAML 1.1 \\(8\\)"),
                                            ("1:30", "a base 60 number to YAML 1.1 \\(90\\)")])
def test_a_number_yaml_1_1_reads_in_another_base_is_refused(tmp_path, value, read_as):
    """`seed: 010` trained with seed 8, `--set train.seed=1:30` with seed 90, silently."""
    path = write(tmp_path, f"data:\n  tasks: [a]\ntrain:\n  seed: {value}\n")
    with pytest.raises(ConfigError, match=rf"{path}, line 4, column 9: not valid YAML: {value} is {read_as}"):
        load_config(path)
    with pytest.raises(ConfigError, match=rf"{value} is {read_as}"):
        load_config(write(tmp_path, "data:\n  tasks: [a]\n"), [f"train.seed={value}"])


def test_numbers_that_read_alike_in_yaml_1_1_and_1_2_still_load(tmp_path):
    from dmea_dist.typed_yaml import parse_yaml

    assert parse_yaml("[0, 10, -3, 0x1f, 1_000, '010', synth.travel.03, 0.5]") == [
        0, 10, -3, 31, 1000, "010", "synth.travel.03", 0.5]


@pytest.mark.parametrize("override", ["method.expansion.candidates[1].beta=0.3", "method.expansion.candidates.1.beta=0.3",
                                      "data.tasks[0]=b"])
def test_a_set_of_one_list_item_says_the_list_is_set_whole(tmp_path, override):
    """`candidates[1].beta` was an unknown key whose "did you mean 'method.expansion.candidates'" led to
    `candidates.1.beta`, refused as "must be a list, got {'1': {'beta': 0.3}}"."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    name = override.split("[")[0].split(".1")[0]
    with pytest.raises(ConfigError, match=rf"--set {re.escape(override)}: {name} is a list, set as a whole "
                                          rf"\(e.g. --set '{name}=\[...\]'\), not item by item"):
        load_config(path, [override])


@pytest.mark.parametrize("override", ["ray.use_gpu=true", "ray.adapt_on=coordinator"])
def test_resume_on_a_gpu_or_with_adaptation_moved_says_the_rest_is_not_bit_for_bit(tmp_path, capsys, override):
    """A change of threads or ranks said so; a GPU's kernels, or adaptation in the coordinator, change the sums as
    much and said nothing."""
    from dmea_dist.preflight import resume_config
    from dmea_dist.typed_yaml import dump_yaml

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(dump_yaml(load_config(write(tmp_path, "data:\n  tasks: [a]\n")).to_dict()))
    resume_config(run_dir, [override])
    err = capsys.readouterr().err
    assert f"note: resuming with {override}" in err.replace("True", "true") and "floating-point" in err
