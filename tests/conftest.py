"""Shared fixtures: tiny local models, the shared data root, GPU skipping.

Nothing here touches the network: models are built from a `GPT2Config` of a few
layers, and real corpora are read from ../shared/data when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("DMEA_DATA_ROOT", REPO_ROOT.parent / "shared" / "data"))

# Keep tests on the CPU and quiet, whatever machine they run on.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared real corpora; tests that need them skip cleanly without them."""
    if not (SHARED_DATA / "rnnlg").is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (set DMEA_DATA_ROOT)")
    return SHARED_DATA


@pytest.fixture
def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=96, n_positions=64, n_embd=32, n_layer=3, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=95, eos_token_id=95,
    )


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing means nothing runs anyway
        has_gpu = False
    if has_gpu:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
