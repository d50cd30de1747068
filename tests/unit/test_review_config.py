"""The config system as a user meets it: mistakes in a config file or a `--set` fail in one line naming the
file, the key and the fix; nothing is silently dropped or read as something else."""

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
    from dmea_dist.config import parse_yaml

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
