"""What a finished run's model writes as pseudo samples of each of its tasks, and why the dropped ones failed.

Loads a run directory (or anything `dmea generate` loads: an MLflow run id, a models:/ URI), generates `--n`
pseudo samples of every recorded task along its own path exactly as the GENERATE stage does
(`generate_pseudo_samples` with the run's top-k, answer decoding and separator settings, seeded), and prints per task the yield, the dropped
samples by reason (formatting.MALFORMED) and, for synthetic tasks, the fidelity; `--show K` prints K kept
samples per task, so what "well formed" means for that model can be read, not only counted.

    python benchmarks/audit_pseudo_samples.py runs/results/runs/main-ABCDE-dmea-s0 --n 64 --show 3
"""

from __future__ import annotations

import argparse

from dmea_dist.data.formatting import MALFORMED
from dmea_dist.data.synthetic import fidelity
from dmea_dist.method.generation import generate_pseudo_samples
from dmea_dist.serving import load_task_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="run directory, MLflow run id or models:/ URI")
    ap.add_argument("--n", type=int, default=64, help="pseudo samples per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0, help="kept samples to print per task")
    args = ap.parse_args()
    served = load_task_model(args.source, latest=True)  # the finished run's model: shared modules as last trained
    ad = served.config.method.adaptation
    reasons = list(MALFORMED)
    print(f"| task | yield | fidelity | {' | '.join(r.replace('_', ' ') for r in reasons)} |")
    print("|" + " --- |" * (3 + len(reasons)))
    shown = []
    for index, task in enumerate(served.tasks):
        out = generate_pseudo_samples(served.models[task], served.formatter, task_id=task, task_index=index,
                                      path=served.paths[task], n=args.n, top_k=ad.top_k_sampling, seed=args.seed,
                                      answer=ad.pseudo_answer, separator=ad.pseudo_separator, batch_size=args.n,
                                      max_rounds=1, scope=served.scopes.get(task))  # the rows up to it, as a run
        faithful = fidelity(task, out.rows)
        print(f"| {task} | {out.well_formed}/{out.generated} | {'-' if faithful is None else f'{faithful:.2f}'} | "
              + " | ".join(str(out.reasons.get(r, 0)) for r in reasons) + " |")
        shown += [(task, row) for row in out.rows[: args.show]]
    for task, row in shown:
        print(f"{task}: {row['context'][:100]!r} => {row['answer'][0][:80]!r}")


if __name__ == "__main__":
    main()
