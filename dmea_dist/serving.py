"""Serve any recorded task of any run: rebuild the model and answer along the task's path.

A run directory (or its MLflow record, downloaded) holds everything needed:
`config.yaml`, the tokenizer (tiny runs) and backbone (tiny runs; pretrained
runs name their checkpoint in the config), and per task
`tasks/NNN-<task>/modules/` (the task's modules + path manifest; for the
full fine-tuning baselines, the whole backbone after that task).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from dmea_dist.config import config_from_dict
from dmea_dist.data.formatting import Formatter
from dmea_dist.data.tokenizer import load_pretrained_tokenizer, load_tokenizer
from dmea_dist.errors import DmeaError
from dmea_dist.method.generation import generate_answers
from dmea_dist.modeling.io import load_path_modules
from dmea_dist.modeling.model import DMEAModel


def task_dir(run_dir: Path, task_id: str) -> Path:
    found = sorted(run_dir.glob(f"tasks/*-{task_id}/modules"))
    if not found:
        known = sorted(p.name.split("-", 1)[1] for p in run_dir.glob("tasks/*-*"))
        raise DmeaError(f"{run_dir} has no recorded task {task_id!r}; recorded: {known}")
    return found[0]


def load_task_model(run_dir: str | Path, task_id: str):
    """(model routed to the task, formatter, path) from a run directory."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise DmeaError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `dmea run` printed")
    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), source=str(run_dir / "config.yaml"))
    modules = task_dir(run_dir, task_id)
    full_finetune = (modules / "config.json").is_file()  # a saved backbone, not adapters
    if config.model.pretrained:
        tokenizer = load_pretrained_tokenizer(config.model.pretrained, max_tasks=config.model.max_tasks)
        source = modules if full_finetune else config.model.pretrained
    else:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
        source = modules if full_finetune else run_dir / "backbone"
    model = DMEAModel.from_pretrained(str(source), vocab_size=len(tokenizer), bottleneck=config.model.bottleneck)
    path = None
    if not full_finetune:
        load_path_modules(model, modules)
        path = model.path_of(task_id)
    return model.eval(), Formatter(tokenizer, max_length=config.model.max_length), path, config


def answer(run_dir: str | Path, task_id: str, contexts: list[str], *, question: str = "",
           decoding: str = "greedy", max_new_tokens: int = 64) -> list[str]:
    model, formatter, path, config = load_task_model(run_dir, task_id)
    rows = [{"context": c, "question": question} for c in contexts]
    return generate_answers(model, formatter, rows, path=path, decoding=decoding, max_new_tokens=max_new_tokens,
                            top_k=config.eval.top_k, batch_size=config.eval.batch_size)
