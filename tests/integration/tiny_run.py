"""A tiny run configuration shared by the distributed integration tests (seconds per stage on a CPU)."""

from __future__ import annotations

from dmea_dist.config import RunConfig, config_from_dict


def tiny_config(tmp, **sections) -> RunConfig:
    """3 generated tasks (two related, one not) on a 2-layer GPT-2; `sections` override top-level sections."""
    raw = {
        "name": "tiny",
        "output_dir": f"{tmp}/runs",
        "data": {"tasks": ["synth.hotel.00", "synth.listops.00", "synth.hotel.01"], "synth_sizes": [64, 12, 12],
                 "overlength": "truncate"},  # a few synth.hotel rows pass max_length=80 with this BPE
        "model": {"tiny": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 96, "vocab_size": 400,
                           "pretrain": {"steps": 60, "batch_size": 16, "seq_len": 48, "heldout_tasks": 2}},
                  "bottleneck": 16, "max_length": 80},
        "train": {"batch_size": 16, "lr": 3e-3, "first_task_epochs": 2},
        "method": {"name": "dmea", "expansion": {"epochs": 2, "warmup_epochs": 1, "coefficient_lr": 0.3,
                                                 "candidates": [{"beta": 1.0}, {"beta": 2.0, "seed": 1}]},
                   "selection": {"top_k": 1, "n_samples": 16}, "adaptation": {"epochs": 1}},
        "eval": {"max_new_tokens": 24, "max_samples": 8},
        "tracking": {"uri": f"sqlite:///{tmp}/mlflow.db"},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return config_from_dict(raw, source="tiny_config")
