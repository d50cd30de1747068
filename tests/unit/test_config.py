"""Config loading: typed values, overrides, and errors that name the key and the fix."""

from pathlib import Path

import pytest

from dmea_dist.config import RunConfig, load_config
from dmea_dist.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_minimal_config_gets_design_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  tasks: [synth.travel.00, synth.travel.01]\n"))
    assert isinstance(cfg, RunConfig)
    assert cfg.method.name == "dmea"
    assert cfg.method.selection.top_k == 2 and cfg.method.selection.epsilon == 0.97
    assert cfg.method.selection.n_samples == 100
    assert cfg.method.adaptation.gamma == 0.2 and cfg.method.adaptation.eta_clamp == [0.1, 10.0]
    assert cfg.train.lm_lambda == 0.25 and cfg.train.lr == 1.75e-4
    assert cfg.tracking.uri == "sqlite:///mlflow.db"


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write(tmp_path, "data:\n  tasks: [a.b]\n")
    cfg = load_config(path, ["train.lr=1e-3", "method.selection.top_k=3", "data.tasks=[x, y]",
                             "method.adaptation.gradient_scaling=false", "deepspeed.zero_optimization.stage=2"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.method.selection.top_k == 3
    assert cfg.data.tasks == ["x", "y"]
    assert cfg.method.adaptation.gradient_scaling is False
    assert cfg.deepspeed == {"zero_optimization": {"stage": 2}}


def test_a_choice_spelled_off_is_the_choice_not_yaml_false(tmp_path):
    """YAML 1.1 reads a bare `off` as false: a choice key whose choices include "off" takes it as "off"."""
    path = write(tmp_path, "data:\n  tasks: [a]\nmethod:\n  adaptation:\n    transfer: off\n")
    assert load_config(path).method.adaptation.transfer == "off"
    assert load_config(path, ["method.adaptation.transfer=off"]).method.adaptation.transfer == "off"
    with pytest.raises(ConfigError, match=r"method.name=True is not accepted"):
        load_config(path, ["method.name=yes"])  # no choice of method.name is spelled like true


def test_unknown_key_names_file_key_and_suggestion(tmp_path):
    path = write(tmp_path, "data:\n  tasks: [a]\nmethod:\n  selection:\n    topk: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "method.selection.topk" in msg and "top_k" in msg


def test_wrong_type_and_range_and_choice(tmp_path):
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=r"train.batch_size must be int"):
        load_config(path, ["train.batch_size=four"])
    with pytest.raises(ConfigError, match=r"method.selection.epsilon=1.5 is out of range"):
        load_config(path, ["method.selection.epsilon=1.5"])
    with pytest.raises(ConfigError, match=r"train.virtual_shards=8 is out of range; accepted: 0 <= virtual_shards <= 4"):
        load_config(path, ["train.batch_size=4", "train.virtual_shards=8"])
    with pytest.raises(ConfigError, match=r"did you mean 'dmea'"):
        load_config(path, ["method.name=dmae"])
    with pytest.raises(ConfigError, match=r"data.tasks is empty"):
        load_config(path, ["data.tasks=[]"])
    with pytest.raises(ConfigError, match=r"must look like key.sub=value"):
        load_config(path, ["train.lr"])
    # 0 epochs would still train one step (adaptation takes at least one): refused like the other epoch keys
    with pytest.raises(ConfigError, match=r"method.adaptation.epochs=0.0 is out of range"):
        load_config(path, ["method.adaptation.epochs=0"])


def test_replay_of_every_earlier_task_is_refused_where_only_the_new_path_trains(tmp_path):
    """dmea with replay 'all' would replay tasks that share no module with the new path: their loss trains
    nothing and the engine refuses the step mid-run; the config says so before anything runs."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=r"method.adaptation.replay='all' with method.name=dmea.*use 'shared'"):
        load_config(path, ["method.adaptation.replay=all"])
    assert load_config(path, ["method.adaptation.replay=none"]).method.adaptation.replay == "none"


def test_trained_token_rows_are_refused_for_methods_that_train_the_whole_backbone(tmp_path):
    """lamol and finetune train every embedding row anyway: model.token_rows 'trained' would do nothing, silently.
    The default, 'auto', trains the word rows with the module methods and leaves the whole-backbone ones alone."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    for method in ("lamol", "finetune"):
        for rows in ("trained", "words"):
            with pytest.raises(ConfigError, match=rf"model.token_rows='{rows}' with method.name={method}.*'frozen'"):
                load_config(path, [f"model.token_rows={rows}", f"method.name={method}"])
        config = load_config(path, [f"method.name={method}"])
        assert (config.model.token_rows, config.trains_token_rows) == ("auto", False)
    for method in ("dmea", "acm", "adapter", "multitask"):
        assert load_config(path, ["model.token_rows=trained", f"method.name={method}"]).trains_token_rows
        assert load_config(path, [f"method.name={method}"]).trains_token_rows  # auto
        assert not load_config(path, ["model.token_rows=frozen", f"method.name={method}"]).trains_token_rows


def test_the_answer_decoding_of_pseudo_samples_reaches_the_kernels(tmp_path):
    from dmea_dist.coordinator import decoding_settings

    path = write(tmp_path, "data:\n  tasks: [a]\n")
    assert decoding_settings(load_config(path)).pseudo_answer == "greedy"
    sampled = load_config(path, ["method.adaptation.pseudo_answer=sampled"])  # LAMOL/ACM's
    assert decoding_settings(sampled).pseudo_answer == "sampled"
    assert decoding_settings(load_config(path)).pseudo_separator == "free"
    assert decoding_settings(load_config(path, ["method.adaptation.pseudo_separator=one"])).pseudo_separator == "one"


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files, "configs/ has no YAML files"
    for path in files:
        cfg = load_config(path)
        assert cfg.data.tasks
        header = path.read_text().splitlines()[0]
        assert header.startswith("#"), f"{path.name} must start with a comment saying how to launch it"


def test_an_unknown_key_given_with_set_is_named_as_an_override_not_as_the_files(tmp_path):
    """A typo in `--set` is not in the YAML file: the error says it came from --set, not only the file's name."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.lrr=1e-3"])
    msg = str(err.value)
    assert msg.startswith(f"{path}: --set train.lrr=1e-3: unknown key 'train.lrr'; did you mean 'train.lr'?")
    with pytest.raises(ConfigError, match=r": --set trian.lr=1: unknown key 'trian'; did you mean 'train'"):
        load_config(path, ["trian.lr=1"])
    # free-form sections keep whatever keys their owner defines
    assert load_config(path, ["deepspeed.zero_optimization.stage=2"]).deepspeed == {"zero_optimization": {"stage": 2}}
    assert load_config(path, ["data.user_tasks.mine.path=x.jsonl"]).data.user_tasks == {"mine": {"path": "x.jsonl"}}


def test_a_set_value_that_yaml_would_cut_at_a_comment_is_refused_and_a_quoted_one_kept(tmp_path):
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=r"'name=run #2': YAML reads the ' #' .* quote the value .*name='run #2'"):
        load_config(path, ["name=run #2"])
    assert load_config(path, ["name='run #2'"]).name == "run #2"
    assert load_config(path, ["name=run#2"]).name == "run#2"  # no space: not a comment
    assert load_config(path, ["data.tasks=[a#1, b]"]).data.tasks == ["a#1", "b"]


@pytest.mark.parametrize("candidate, message", [
    ("{beta: high}", r"method.expansion.candidates\[1\].beta='high' must be a number"),
    ("{beta: -1}", r"method.expansion.candidates\[1\].beta=-1.0 is out of range"),
    ("{entropy_weight: [1]}", r"method.expansion.candidates\[1\].entropy_weight=\[1\] must be a number"),
    ("{seed: 1.5}", r"method.expansion.candidates\[1\].seed=1.5 must be an int"),
])
def test_a_candidates_override_values_are_checked_before_the_run_not_at_the_second_task(tmp_path, candidate,
                                                                                           message):
    """The search reads candidates only from the second task on: a bad value would fail there, mid-run."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [f"method.expansion.candidates=[{{}}, {candidate}]"])
    ok = load_config(path, ["method.expansion.candidates=[{}, {beta: 0.3, entropy_weight: 0, seed: 7}]"])
    assert ok.method.expansion.candidates[1] == {"beta": 0.3, "entropy_weight": 0, "seed": 7}


def test_an_override_that_is_not_yaml_is_refused_in_one_line(tmp_path):
    """`--set data.tasks=[x` printed the YAML parser's six-line excerpt after `error:`; one line says what and where."""
    path = write(tmp_path, "data:\n  tasks: [a]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.tasks=[x"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("override 'data.tasks=[x': value is not valid YAML: expected ',' or ']'")
    assert "at character 3 of the value" in message


def test_a_run_config_whose_strings_look_like_exponent_floats_reads_back_as_written(tmp_path):
    """config.yaml was written with yaml.safe_dump, which leaves `1e5` unquoted (PyYAML reads it as a string),
    but configs are read with YAML 1.2 numbers: a run named 1e5 could not resume ("name must be str")."""
    from dmea_dist.config import config_from_dict
    from dmea_dist.typed_yaml import dump_yaml

    config = config_from_dict({"name": "1e5", "data": {"tasks": ["synth.hotel.00"]}, "train": {"lr": 1e-3}})
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(config.to_dict()))
    again = load_config(path)
    assert again.name == "1e5" and again.train.lr == 1e-3
    assert again.to_dict() == config.to_dict()


def test_the_literatures_training_defaults(tmp_path):
    """ACM/LAMOL's choices are the defaults (issue 7): the answer separator weighted x5 in the losses, the
    expansion coefficients at the adapters' learning rate (None: in the adapters' AdamW) from +-0.15,
    one replay batch beside each new-task batch, gamma * N pseudo samples in all."""
    cfg = load_config(write(tmp_path, "data:\n  tasks: [synth.travel.00, synth.travel.01]\n"))
    assert cfg.train.separator_weight == 5.0
    assert cfg.method.expansion.coefficient_lr is None and cfg.method.expansion.mix_ini == 0.15
    assert cfg.method.adaptation.mixing == "alternate" and cfg.method.adaptation.pseudo_budget == "total"
    assert cfg.train.full_finetune_lr == 6.25e-5


@pytest.mark.parametrize("method", ["dmea", "acm", "lamol", "finetune"])
def test_the_adaptation_engine_gets_each_methods_learning_rate_and_the_eta_clamp(tmp_path, method):
    """lamol and finetune train the whole model at train.full_finetune_lr (LAMOL's rate), the module methods
    their adapters at train.lr; the engine clamps eta to method.adaptation.eta_clamp."""
    from dmea_dist.settings import engine_settings

    path = write(tmp_path, "data:\n  tasks: [a]\n")
    cfg = load_config(path, [f"method.name={method}", "train.lr=3e-4", "train.full_finetune_lr=2e-5",
                             "method.adaptation.eta_clamp=[0.5, 4.0]"])
    settings = engine_settings(cfg)
    lr = settings.ds_config["optimizer"]["params"]["lr"]
    assert lr == (2e-5 if method in ("lamol", "finetune") else 3e-4)
    assert tuple(settings.clamp) == (0.5, 4.0)
