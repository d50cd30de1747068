"""A long run folder (50 synthetic tasks by default) as `dmea run` leaves it, written without training.

`make_long_run(root, ...)` writes config.yaml, state.json, every task's
record.json and module manifest and metrics.json, from numbers drawn by a
seeded generator: scores that fall as later tasks are learnt (listops lower),
paths that reuse a related earlier task's modules, top-2 selection with its
replay and pseudo samples, eta and loss histories, and the stage history
(a resumed run repeats the stage it was stopped in). `every` > 1 leaves the
rows between full evaluations with only the task just trained, R[j][j], as
`eval.every` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml

from dmea_dist.data.synthetic import task_relatedness

SYNTH50 = yaml.safe_load((Path(__file__).parents[2] / "configs" / "synth50_tiny.yaml").read_text())["data"]["tasks"]
N_LAYERS = 4


def long_r(tasks: list[str], *, every: int = 1, done: int | None = None, seed: int = 0) -> np.ndarray:
    """(T, T) scores: row j after task j; NaN above the diagonal, between eval.every's full rows (all but
    R[j][j]) and past `done` tasks (a stopped run)."""
    rng = np.random.default_rng(seed)
    n = len(tasks)
    own = np.array([38.0 if ".listops." in t else 80.0 for t in tasks]) + rng.uniform(-6, 8, n)
    R = np.full((n, n), np.nan)
    for j in range(n):
        full = (j + 1) % every == 0 or j == n - 1
        for i in range(j + 1):
            if i == j or full:
                R[j, i] = own[i] - (j - i) * rng.uniform(0.0, 0.4)
    if done is not None:
        R[done:] = np.nan
    return R


def make_long_run(root: Path, *, tasks: list[str] = SYNTH50, method: str = "dmea", every: int = 1,
                  done: int | None = None, resumed: bool = False, seed: int = 0, name: str = "synth50-tiny") -> Path:
    """A run folder of `tasks`; `done`: tasks finished before it stopped (None: all, status finished)."""
    rng = np.random.default_rng(seed)
    n = len(tasks)
    finished = done is None
    done = n if done is None else done
    R = long_r(tasks, every=every, done=None if finished else done, seed=seed)
    run = root / f"{name}-20260101-000000-{method}"
    (run / "tasks").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": name, "method": {"name": method, "adaptation": {"eta_clamp": [0.1, 10.0]}},
        "eval": {"metric": "rouge", "every": every}, "data": {"tasks": list(tasks)}}))
    paths, owners, states, history = {}, [[] for _ in range(N_LAYERS)], [], []
    similarity = np.full((n, n), np.nan)
    for k, task in enumerate(tasks[:done]):
        related = [task_relatedness(old, task) + rng.uniform(0, 0.1) for old in tasks[:k]]
        similarity[k, :k] = np.clip(related, 0, 1)
        selected = [tasks[i] for i in np.argsort(related)[::-1][:2]] if k else []
        base = paths[selected[0]] if selected else [0] * N_LAYERS
        path, new = [], 0
        for layer in range(N_LAYERS):  # reuse the best match's module, or add one
            if k and rng.uniform() < 0.7:
                path.append(base[layer])
            else:
                owners[layer].append(len(owners[layer]))
                path.append(len(owners[layer]) - 1)
                new += 1
        paths[task] = path
        states.append({"task_id": task, "index": k, "path": path, "selected": selected})
        for stage, seconds in (("expand", 8.0), ("select", 0.5), ("generate", 4.0), ("adapt", 20.0),
                               ("evaluate", 6.0 if (k + 1) % every == 0 else 1.0), ("record", 0.2)):
            history.append({"task": task, "task_index": k, "stage": stage, "seconds": seconds * rng.uniform(0.7, 1.3)})
            if resumed and k == done // 2 and stage == "adapt":  # stopped in adapt, resumed: its second finish
                history.append({"task": task, "task_index": k, "stage": stage, "seconds": 3.0})
        steps = 30 + 10 * (k % 3)
        rec = {"task_id": task, "task_index": k, "metrics": {"new_modules": float(new)},
            "params": {"path": path, "selected": selected, "transfer": selected, "replay": selected,
                       "token_similarity": {old: float(similarity[k, i]) for i, old in enumerate(tasks[:k])}},
            "series": {"loss.new": list(np.linspace(2.5, 0.8, steps) + rng.normal(0, 0.05, steps))}}
        for old in selected:
            rec["series"][f"loss.replay:{old}"] = list(np.linspace(1.5, 0.9, steps) + rng.normal(0, 0.05, steps))
            rec["series"][f"eta.replay:{old}"] = list(np.clip(np.geomspace(rng.uniform(2, 10), 1.0, steps), 0.1, 10))
            rec["metrics"].update({f"pseudo.yield.{old}": rng.uniform(0.8, 1.0),
                                   f"pseudo.fidelity.{old}": rng.uniform(0.4, 0.9),
                                   f"pseudo.real_fidelity.{old}": rng.uniform(0.7, 1.0),
                                   f"pseudo.kept.{old}": 32.0, f"pseudo.requested.{old}": 32.0})
        folder = run / "tasks" / f"{k:03d}-{task}"
        (folder / "modules").mkdir(parents=True)
        (folder / "modules" / "manifest.json").write_text(json.dumps({"d_model": 64, "bottleneck": 32}))
        (folder / "record.json").write_text(json.dumps(rec))
    matrix = [[None if np.isnan(v) else float(v) for v in row] for row in R]
    state = {"format": "dmea-run-state", "version": 1, "task_index": n - 1 if finished else done,
             "stage": "done" if finished else "adapt", "status": "finished" if finished else "stopped", "R": matrix,
             "similarity": [[None if np.isnan(v) else float(v) for v in row] for row in similarity],
             "history": history, "tasks": states + [{"task_id": t, "index": done + i}
                                                     for i, t in enumerate(tasks[done:])]}
    (run / "state.json").write_text(json.dumps(state))
    if finished:
        from dmea_dist.evaluation.run_data import sequence_metrics

        (run / "metrics.json").write_text(json.dumps(sequence_metrics(R, every=every)))
    return run
