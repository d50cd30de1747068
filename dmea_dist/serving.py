"""Serve any recorded task of any run: rebuild the model and answer along the task's path.

A run directory (or its MLflow record, downloaded) holds everything needed:
`config.yaml`, the tokenizer (tiny runs) and backbone (tiny runs; pretrained
runs name their checkpoint in the config), and per task
`tasks/NNN-<task>/modules/` (the task's modules + path manifest; for the
full fine-tuning baselines, the whole backbone after that task).

A task folder without `modules/` is a task whose run stopped before recording
it: the error says so, with the stage the run's state file names, and how to
finish it, rather than listing the task among the "recorded" ones. Damaged
module files fail in `modeling/io.py`; a damaged backbone or tokenizer folder
fails here, naming the folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from dmea_dist.config import load_config
from dmea_dist.data.formatting import Formatter
from dmea_dist.data.lengths import prompt_length
from dmea_dist.data.tokenizer import load_pretrained_tokenizer, load_tokenizer
from dmea_dist.errors import DmeaError
from dmea_dist.method.generation import generate_answers
from dmea_dist.modeling.io import load_path_modules
from dmea_dist.modeling.model import DMEAModel

# state files that name where a run stopped: the run state, or the lifecycle file of older runs
STATE_FILES = ("state.json", "lifecycle.json")


def task_dir(run_dir: Path, task_id: str) -> Path:
    """`tasks/NNN-<task>/modules` of a recorded task, or an error saying what became of the task."""
    found = sorted(run_dir.glob(f"tasks/*-{task_id}/modules"))
    if found:
        return found[0]
    recorded = sorted(p.parent.name.split("-", 1)[1] for p in run_dir.glob("tasks/*-*/modules"))
    if any(run_dir.glob(f"tasks/*-{task_id}")):
        raise DmeaError(f"task {task_id!r} of {run_dir} was not finished: {stopped_at(run_dir)}, before "
                        f"recording it; finish the run with `dmea resume {run_dir}` (or start it again with "
                        f"`dmea run {run_dir / 'config.yaml'}`); recorded tasks: {recorded}")
    raise DmeaError(f"{run_dir} has no task {task_id!r}; recorded tasks: {recorded}")


def stopped_at(run_dir: Path) -> str:
    """Where the run stopped, as its state file says ("the run stopped" when no file says)."""
    for name in STATE_FILES:
        try:
            state = json.loads((run_dir / name).read_text())
            tasks = [t["task_id"] if isinstance(t, dict) else t for t in state["tasks"]]
            where = f"at the {state['stage']} stage of task {state['task_index'] + 1}/{len(tasks)} " \
                    f"({tasks[state['task_index']]})"
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue
        status = state.get("status")  # running: the driver died without a word
        said = f" ({str(state['message'])[:200]})" if state.get("message") else ""
        return f"its run {status if status in ('stopped', 'failed') else 'stopped'} {where}{said}"
    return "its run stopped"


def load_task_model(run_dir: str | Path, task_id: str):
    """(model routed to the task, formatter, path) from a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DmeaError(f"{run_dir} does not exist; pass the run directory `dmea run` printed")
    if not (run_dir / "config.yaml").is_file():
        raise DmeaError(f"{run_dir} is not a run directory (no config.yaml); pass the folder `dmea run` printed")
    config = load_config(run_dir / "config.yaml")  # a damaged file fails as a ConfigError naming it
    modules = task_dir(run_dir, task_id)
    full_finetune = (modules / "config.json").is_file()  # a saved backbone, not adapters
    if config.model.pretrained:
        tokenizer = load_pretrained_tokenizer(config.model.pretrained, max_tasks=config.model.max_tasks)
        source = modules if full_finetune else config.model.pretrained
    else:
        tokenizer = _tokenizer(run_dir / "tokenizer")
        source = modules if full_finetune else run_dir / "backbone"
    model = _backbone(source, vocab_size=len(tokenizer), bottleneck=config.model.bottleneck)
    path = None
    if not full_finetune:
        load_path_modules(model, modules)
        path = model.path_of(task_id)
    return model.eval(), Formatter(tokenizer, max_length=config.model.max_length), path, config


def _backbone(source, *, vocab_size: int, bottleneck: int | None) -> DMEAModel:
    """DMEAModel.from_pretrained, with a damaged or missing local checkpoint named instead of a traceback."""
    try:
        return DMEAModel.from_pretrained(str(source), vocab_size=vocab_size, bottleneck=bottleneck)
    except (OSError, ValueError, RuntimeError) as err:  # transformers and safetensors raise these
        if not Path(source).is_dir():
            raise  # a hub name: not a file of this run
        raise DmeaError(f"{source}: the backbone checkpoint cannot be loaded ({type(err).__name__}: "
                        f"{str(err)[:200]}); restore the folder from the run's MLflow artifacts or a backup, "
                        f"or run the sequence again") from None


def _tokenizer(directory: Path):
    if not directory.is_dir():
        raise DmeaError(f"{directory}: not found; the run stopped before saving its tokenizer, or the folder "
                        f"was removed: restore it or run the sequence again")
    return load_tokenizer(directory)


def answer(run_dir: str | Path, task_id: str, contexts: list[str], *, question: str = "",
           decoding: str = "greedy", max_new_tokens: int = 64) -> list[str]:
    model, formatter, path, config = load_task_model(run_dir, task_id)
    rows = [{"context": c, "question": question} for c in contexts]
    for i, row in enumerate(rows):  # a longer prompt would be cut at its end, silently answering another input
        tokens = prompt_length(formatter, row["context"], row["question"])
        if tokens > formatter.max_length:
            raise DmeaError(f"input {i + 1} is {tokens} tokens with the answer separator, longer than this run's "
                            f"model.max_length={formatter.max_length}; shorten it")
    return generate_answers(model, formatter, rows, path=path, decoding=decoding, max_new_tokens=max_new_tokens,
                            top_k=config.eval.top_k, batch_size=config.eval.batch_size)
