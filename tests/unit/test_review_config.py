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
