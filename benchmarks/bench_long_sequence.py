"""A long task sequence at bounded cost: run it (or read finished runs) and print the per-task table.

    .venv/bin/python benchmarks/bench_long_sequence.py --config configs/synth50_tiny.yaml \
        --methods dmea acm finetune --out /tmp/long
    .venv/bin/python benchmarks/bench_long_sequence.py --read /tmp/long/dmea      (an existing run directory)

Each method runs as `dmea run CONFIG --set method.name=M` (embedded Ray unless --in-process), one after
another, into OUT/M. Per task (from the run's state.json): seconds per stage, the coordinator's peak memory,
new modules, the module parameters in the pools and the pool sizes after the task; then the growth ratios
the issue asks for (the last task against task 5, and the mean of the last five against tasks 5-9: compute
without evaluation; peak memory; evaluation seconds per task scored, the scores in that task's row of R:
the tasks seen, or every task with `eval.all_tasks`; between `eval.every`'s full rows the task just trained,
and with `eval.all_tasks` the next), the final average
and BWT per method, and, for synthetic sequences, selection precision@K against the generator's ground
truth (`task_relatedness > 0`: the same family): per task with an earlier task of its family, the selected
tasks of its family over min(K, such earlier tasks), averaged.

Peak memory is the high-water mark of each process since it started (`ru_maxrss`): the coordinator's (on Ray
the coordinator actor; in process the whole run) and, on Ray, the largest of each kind of worker that holds a
model (training ranks, generation and search actors, or "replicas" where one pool does both), which each
task's record holds (`worker_peak_rss_mib`; runs from before it have none).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ["expand", "select", "generate", "adapt", "evaluate", "record"]


def run(config: str, method: str, out: Path, *, in_process: bool) -> Path:
    run_dir = out / method
    if (run_dir / "metrics.json").is_file():
        return run_dir
    out.mkdir(parents=True, exist_ok=True)  # the sqlite tracking store lives there
    cmd = [sys.executable, "-m", "dmea_dist.cli", "run", config, "--quiet", "--run-dir", str(run_dir),
           "--set", f"method.name={method}", "--set", f"output_dir={out}", "--set",
           f"tracking.uri=sqlite:///{out / 'mlflow.db'}"]
    if in_process:
        cmd.append("--in-process")
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    return run_dir


def per_task(run_dir: Path) -> list[dict]:
    state = json.loads((run_dir / "state.json").read_text())
    rows = []
    for t in state["tasks"]:
        mine = [h for h in state["history"] if h["task_index"] == t["index"]]
        row = {"task": t["task_id"], **{s: sum(h["seconds"] for h in mine if h["stage"] == s) for s in STAGES}}
        record = next((h for h in mine if h["stage"] == "record"), {})
        row.update(new=t.get("new_modules") or 0, params=record.get("module_parameters", 0),
                   pools=record.get("pool_sizes", []), peak=max((h.get("peak_rss_mib", 0) for h in mine), default=0),
                   workers=record.get("worker_peak_rss_mib", {}),
                   selected=t.get("selected", []),
                   scored=sum(1 for x in state["R"][t["index"]] if x is not None))
        rows.append(row)
    return rows


def precision_at_k(rows: list[dict]) -> tuple[float, int] | None:
    from dmea_dist.data.synthetic import task_relatedness

    scores = []
    for n, row in enumerate(rows):
        if not row["task"].startswith("synth.") or not row["selected"]:
            continue
        related = [r["task"] for r in rows[:n] if task_relatedness(row["task"], r["task"]) > 0]
        if related:
            hits = sum(1 for t in row["selected"] if t in related)
            scores.append(hits / min(len(row["selected"]), len(related)))
    return (sum(scores) / len(scores), len(scores)) if scores else None


def print_table(name: str, rows: list[dict]) -> None:
    print(f"\n### {name}\n")
    print("| # | task | " + " | ".join(STAGES) + " | peak MiB | workers' peak MiB | new modules | module params | "
          "pool sizes |")
    print("|" + "---|" * (len(STAGES) + 7))
    for i, r in enumerate(rows, 1):
        stages = " | ".join(f"{r[s]:.1f}" for s in STAGES)
        workers = ", ".join(f"{role} {mib:.0f}" for role, mib in sorted(r.get("workers", {}).items())) or "-"
        print(f"| {i} | {r['task']} | {stages} | {r['peak']:.0f} | {workers} | {r['new']} | {r['params']:,} | "
              f"{' '.join(map(str, r['pools']))} |")


def growth(rows: list[dict]) -> str:
    """Compute without evaluation and peak memory at the last task against the 5th, the mean of the last five
    against tasks 5-9; evaluation seconds per task scored, at the first evaluated task from the 5th and at the
    last."""
    def compute(r):
        return sum(r[s] for s in STAGES if s != "evaluate")

    def mean_compute(part):
        return sum(compute(r) for r in part) / len(part)

    n = len(rows)
    if n < 10:
        return "sequence too short for growth ratios"
    first, last = rows[4], rows[-1]
    evaluated = [(i, r) for i, r in enumerate(rows) if r["scored"]]
    early = next(((i, r) for i, r in evaluated if i >= 4), None)
    roles = sorted(set(first.get("workers", {})) & set(last.get("workers", {})))
    workers = (" (workers: " + ", ".join(f"{role} {last['workers'][role] / first['workers'][role]:.2f}x"
                                         for role in roles) + ")") if roles else ""
    out = (f"task {n} / task 5: compute without evaluation {compute(last) / compute(first):.2f}x, "
           f"peak memory {last['peak'] / max(first['peak'], 1):.2f}x{workers}; mean of tasks {n - 4}-{n} / mean of "
           f"tasks 5-9: compute without evaluation {mean_compute(rows[-5:]) / mean_compute(rows[4:9]):.2f}x")
    if early is None or not last["scored"]:
        return out + "; evaluation: no task scored from task 5 on, or not the last"
    i, r = early
    return (out + f"; evaluation per task scored {r['evaluate'] / r['scored']:.2f} s at task {i + 1} "
            f"({r['scored']} scored), {last['evaluate'] / last['scored']:.2f} s at task {n} ({last['scored']} scored)")

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run this config")
    parser.add_argument("--methods", nargs="+", default=["dmea"])
    parser.add_argument("--out", default="runs/long")
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--read", nargs="+", default=[], help="finished run directories to read instead")
    args = parser.parse_args()
    dirs = [Path(d) for d in args.read]
    if args.config:
        dirs += [run(args.config, m, Path(args.out).resolve(), in_process=args.in_process) for m in args.methods]
    summary = []
    for run_dir in dirs:
        rows = per_task(run_dir)
        print_table(run_dir.name, rows)
        print("\n" + growth(rows))
        metrics = json.loads((run_dir / "metrics.json").read_text())
        p = precision_at_k(rows)
        total = sum(sum(r[s] for s in STAGES) for r in rows)
        summary.append((run_dir.name, metrics, p, total))
    print("\n| run | final average | BWT | forgetting | precision@K (tasks) | stage seconds |")
    print("|---|---|---|---|---|---|")
    for name, m, p, total in summary:
        prec = f"{p[0]:.2f} ({p[1]})" if p else "-"
        print(f"| {name} | {m['final_average']:.2f} | {m.get('bwt', float('nan')):.2f} | "
              f"{m.get('forgetting', float('nan')):.2f} | {prec} | {total:.0f} |")


if __name__ == "__main__":
    main()
