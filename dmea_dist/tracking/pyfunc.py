"""The pyfunc model of one recorded task (MLflow's `PythonModel`), loaded by MLflow only.

Imported by the loader script of a registered task model (registry.py) when
MLflow loads it (`mlflow models serve`, `mlflow.pyfunc.load_model`); nothing
in dmea-dist imports it, so importing dmea_dist never imports MLflow.

Input: a DataFrame (or records) with `context`, optional `question` and
`task` (only this model's task: each registered version holds one task; use
`dmea generate` or `dmea_dist.load_task_model` for several tasks at once).
Params: decoding (greedy | top_k), max_new_tokens, top_k, seed, batch_size.
Output: one answer per row, as `dmea generate` gives it.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc


class DmeaTaskModel(mlflow.pyfunc.PythonModel):
    """Answers inputs with one task of a dmea run (its modules along its path on the frozen backbone)."""

    def load_context(self, context) -> None:
        from dmea_dist.serving import load_task_model

        self.task_id = context.model_config["task_id"]
        self.tasks = load_task_model(context.artifacts["run"], self.task_id)

    # No type hints on predict: MLflow would validate inputs against them too; the signature does that. (MLflow
    # 3.17 says "Add type hints to the `predict` method" once when it loads this class: that is why.)
    def predict(self, context, model_input, params=None):
        params = dict(params or {})
        rows = _records(model_input)
        others = sorted({str(r["task"]) for r in rows if r.get("task") not in (None, "", self.task_id)})
        if others:
            raise ValueError(f"this model answers task {self.task_id!r} only; rows name {others}: use their own "
                             f"aliases, or `dmea generate` for several tasks in one batch")
        return self.tasks.generate(rows, task=self.task_id, decoding=str(params.get("decoding", "greedy")),
                                   max_new_tokens=int(params.get("max_new_tokens", 64)),
                                   top_k=int(params.get("top_k", 20)), seed=int(params.get("seed", 0)),
                                   batch_size=int(params.get("batch_size", 32)))


def _records(model_input) -> list[dict[str, Any]]:
    """A DataFrame, a list of records or strings, or a dict of columns -> [{context, question, task}]."""
    if hasattr(model_input, "to_dict"):  # pandas DataFrame
        model_input = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        columns = {k: v if isinstance(v, list) else [v] for k, v in model_input.items()}
        model_input = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    rows = [{"context": r} if isinstance(r, str) else dict(r) for r in model_input]
    for row in rows:  # pandas gives NaN/None for a missing optional column
        if not isinstance(row.get("question"), str):
            row["question"] = ""
    return rows
