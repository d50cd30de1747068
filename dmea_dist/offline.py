"""No network at run time: a `dmea` command downloads no weights, tokenizers, data or metric scripts.

A hub name (`model.pretrained: gpt2`) loads from the local Hugging Face cache only, and a name not there is
refused at once with how to fetch it beforehand. Without this, transformers asks huggingface.co for every
file first, and an offline node retries for ~25 s before it fails or falls back to the cache.
"""

from __future__ import annotations

import os
import sys

# for every from_pretrained of a checkpoint a user names
OFFLINE = {"local_files_only": True}
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def no_downloads() -> None:
    """Put this process's Hugging Face libraries, and the Ray workers it starts (`cluster.connect` passes the
    variables on), in offline mode. `local_files_only` alone is not enough: to build its request headers
    huggingface_hub fetches a registry from the hub even for a cached file."""
    for var in OFFLINE_VARS:
        os.environ[var] = "1"
    constants = sys.modules.get("huggingface_hub.constants")  # it reads the environment once, when imported
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
