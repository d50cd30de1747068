"""What later tasks' token rows cost earlier tasks, in finished runs.

The rows of words the backbone never learned (`model.token_rows`) are scored by the tied LM head for every
task, whatever its path, so rows a later task trains compete in an earlier task's softmax. For each earlier
task of each run this answers the task's test inputs (as the run's evaluation does: greedy, eval.max_samples,
eval.max_new_tokens) with the run's final modules twice: with every task's rows, as runs before the rows were
scoped evaluated (R's last row of such a run, to the digit), and with only the rows of the tasks up to it, as
runs now evaluate and serve every task (`DMEAModel.only_rows_of`; R's last row of such a run). It prints both
and the change.

    python benchmarks/token_rows_leak.py RUN_DIR [RUN_DIR ...] [--data-root ../shared/data]

Runs of full fine-tuning methods (no rows) are skipped. One thread, one model at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch


def leak(run_dir: Path, data_root: str | None) -> list[tuple[str, float, float, float, float]]:
    """Per earlier task: (task, score after learning it, R's final, final with every row, final with its own)."""
    from dmea_dist.evaluation.metrics import score_task
    from dmea_dist.run import load_tasks
    from dmea_dist.serving import load_task_model, recorded_tasks

    names = recorded_tasks(run_dir)
    served = load_task_model(run_dir, names[-1], tasks=names, latest=True)
    config = served.config
    if data_root is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, root=data_root))
    rows = {task.task_id: task.rows["test"][: config.eval.max_samples or None] for task in load_tasks(config)}
    R = np.load(run_dir / "R.npy")
    out = []
    for i, name in enumerate(names[:-1]):
        inputs = [{"context": r["context"], "question": r["question"]} for r in rows[name]]
        references = [r["answer"] for r in rows[name]]

        def score(name=name, inputs=inputs, references=references, served=served) -> float:
            answers = served.generate(inputs, task=name, max_new_tokens=config.eval.max_new_tokens)
            return score_task(config.eval.metric, answers, references)["primary"]

        own_rows = score()  # a task is served in its scope: the rows of the tasks up to it
        every_row = score(served=dataclasses.replace(served, scopes={}))  # no scopes: every task's rows
        out.append((name, float(R[i, i]), float(R[-1, i]), every_row, own_rows))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data-root", default=None, help="where the corpora are (default: the run's data.root)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | task | after learning it | final (R) | final, every task's rows | final, rows up to it | change |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    changes = []
    for run_dir in args.runs:
        if any((run_dir / "tasks").glob("*/modules/config.json")):
            print(f"| {run_dir.name} | (full fine-tuning: no token rows) | | | | | |")
            continue
        for name, own, final, every_row, own_rows in leak(run_dir, args.data_root):
            changes.append(own_rows - every_row)
            print(f"| {run_dir.name} | {name} | {own:.1f} | {final:.1f} | {every_row:.1f} | {own_rows:.1f} | "
                  f"{own_rows - every_row:+.1f} |")
    if changes:
        moved = sum(abs(c) > 1 for c in changes)
        print(f"\n{len(changes)} earlier-task finals; {moved} moved by more than 1 point without the later tasks' "
              f"rows; mean change {np.mean(changes):+.2f}")


if __name__ == "__main__":
    main()
