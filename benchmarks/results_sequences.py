"""Run a named matrix of lifelong-sequence runs serially, then print Markdown tables of their results.

Each run is one `python -m dmea_dist.cli run CONFIG --in-process --set ...` subprocess with
DS_ACCELERATOR=cpu, TOKENIZERS_PARALLELISM=false and PYTHONPATH=<code> (default: the repository this
script lives in; --code DIR measures another checkout, e.g. a frozen git worktree). A run whose run dir
already holds metrics.json is skipped, so an interrupted matrix resumes where it stopped.

    python benchmarks/results_sequences.py --only quickstart              # run, then tables
    python benchmarks/results_sequences.py --only main,ablations,synth10 --dry-run   # commands only
    python benchmarks/results_sequences.py --code ../exp --out /tmp/results --report-only

Groups: main (RNNLG+E2E tiny, orders ABCDE/EDCBA x dmea/acm/lamol x seeds 0-3; main-s0 ... main-s3 are its
parts by seed, e.g. --only quickstart,main-s0,ablations,synth10,main-s1 runs in that order), ablations (ABCDE,
seed 0: adapter, finetune, multitask, dmea static init, random selection, no gradient scaling; run on a checkout
whose default transfer is gated, these are the gated ablations), ablations-s12 (DMEA's three ablations, ABCDE,
seeds 1 and 2), transfer (dmea with
method.adaptation.transfer off and gated, both orders, seeds 0 and 1, and DMEA's three ablations with
transfer gated explicitly, ABCDE seeds 0 and 1, for checkouts from before gated was the default),
quickstart-transfer (transfer off and gated on the quick start, seeds 0-2), rows (dmea and acm with
model.token_rows=trained, both orders, seeds 0-3; rows-s0 ... rows-s3 by seed), words-s0 ... words-s3 (the same
with model.token_rows=words), quickstart-frozen and quickstart-words (dmea and acm, seeds 0-4, with that
model.token_rows), usable-s0 ... usable-s3 (dmea with method.adaptation.transfer=usable, both orders),
separator (dmea, seed 0, both orders:
method.adaptation.pseudo_separator=one, transfer=off, and both; section 2f), synth10 (10
synthetic tasks, dmea, seeds 0-2; also selection precision@K against the generator's ground truth), quickstart
({dmea, acm, dmea without gradient scaling} x seeds 0-4), route (dmea with method.selection.route own and
earlier: synth10 seeds 0-4 and RNNLG+E2E seed 0, both orders), route-s123 (the same on RNNLG+E2E seeds 1-3), gamma (dmea
with method.adaptation.gamma=0.5, both orders, seeds 0-3), gamma1 (dmea at
1.0), gamma-acm (acm at 0.5, seeds 0-3), split-all (dmea with method.adaptation.pseudo_split=all, both orders,
seeds 0-3). Run dirs: OUT/runs/<label>; logs:
OUT/logs/<label>.log. Wall time is the sum of the stage seconds in state.json (lifecycle.json in older checkouts) (backbone
pretraining, which is cached per config and seed, is not a stage and is not counted; "process s" is the
whole subprocess, pretraining included, as execute() recorded it in the run dir's command.txt). After the
per-method means comes a paired table: every other method minus dmea over the (order, seed) pairs both ran
(mean +- sd of the differences, and in how many pairs dmea is ahead), e.g. `--only main-s0,ablations
--report-only` pairs each ablation with main-ABCDE-dmea-s0.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean, stdev

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
ORDERS = {"ABCDE": "configs/rnnlg_e2e_abcde_tiny.yaml", "EDCBA": "configs/rnnlg_e2e_edcba_tiny.yaml"}
# (label, method label for the tables, config, order, seed, overrides)
Run = tuple[str, str, str, str, int, list[str]]


def matrix(synth_config: str) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {"main": [], "ablations": [], "transfer": [], "synth10": [], "quickstart": [],
                                    "quickstart-transfer": []}
    for seed in (0, 1, 2, 3):  # seed 0 of both orders first: the matrix runs in this order
        for order, cfg in ORDERS.items():
            for m in ("dmea", "acm", "lamol"):
                groups["main"].append((f"main-{order}-{m}-s{seed}", m, cfg, order, seed, [f"method.name={m}"]))
    abl = [("adapter", ["method.name=adapter"]), ("finetune", ["method.name=finetune"]),
           ("multitask", ["method.name=multitask"]),
           ("dmea-static-init", ["method.name=dmea", "method.expansion.init=static"]),
           ("dmea-random-sel", ["method.name=dmea", "method.selection.mode=random"]),
           ("dmea-no-gs", ["method.name=dmea", "method.adaptation.gradient_scaling=false"])]
    for seed in (0, 1, 2, 3):
        groups[f"main-s{seed}"] = [r for r in groups["main"] if r[4] == seed]
    groups["ablations"] = [(f"abl-ABCDE-{m}-s0", m, ORDERS["ABCDE"], "ABCDE", 0, o) for m, o in abl]
    groups["rows"] = []
    for seed in (0, 1, 2, 3):  # the module methods with the backbone's untrained token rows trained by their task
        groups[f"rows-s{seed}"] = [(f"rows-{order}-{m}-s{seed}", f"{m}, token rows", cfg, order, seed,
                                    [f"method.name={m}", "model.token_rows=trained"])
                                   for order, cfg in ORDERS.items() for m in ("dmea", "acm")]
        groups["rows"] += groups[f"rows-s{seed}"]
        groups[f"words-s{seed}"] = [(f"words-{order}-{m}-s{seed}", f"{m}, word rows", cfg, order, seed,
                                     [f"method.name={m}", "model.token_rows=words"])
                                    for order, cfg in ORDERS.items() for m in ("dmea", "acm")]
    for seed in (0, 1, 2, 3):  # dmea whose transfer takes the next task in selection's order past the gate
        groups[f"usable-s{seed}"] = [(f"usable-{order}-dmea-s{seed}", "dmea, transfer usable", cfg, order, seed,
                                      ["method.name=dmea", "method.adaptation.transfer=usable"])
                                     for order, cfg in ORDERS.items()]
    # RESULTS section 2f: pseudo samples kept to one separator, with the transfer gate and with transfer off,
    # and transfer off alone (free and gated: main-*-dmea-s0), dmea, seed 0, both orders
    sep = [("one", ["method.adaptation.pseudo_separator=one"]), ("off", ["method.adaptation.transfer=off"]),
           ("one-off", ["method.adaptation.pseudo_separator=one", "method.adaptation.transfer=off"])]
    groups["separator"] = [(f"sep-{order}-dmea-{name}-s0", f"dmea, {name}", cfg, order, 0, ["method.name=dmea", *o])
                           for name, o in sep for order, cfg in ORDERS.items()]
    # DMEA's own ablations again where one seed cannot tell them from full DMEA (issue 7: "more where a
    # difference is within noise"); compare with main-ABCDE-dmea-s1/-s2
    groups["ablations-s12"] = [(f"abl-ABCDE-{m}-s{seed}", m, ORDERS["ABCDE"], "ABCDE", seed, o)
                               for seed in (1, 2) for m, o in abl if m.startswith("dmea-")]
    for seed in (0, 1):  # how selected tasks transfer (method.adaptation.transfer), both orders
        for order, cfg in ORDERS.items():
            for mode, name in (("off", "no-transfer"), ("gated", "gated-transfer")):
                groups["transfer"].append((f"abl-{order}-dmea-{name}-s{seed}", f"dmea-{name}", cfg, order, seed,
                                           ["method.name=dmea", f"method.adaptation.transfer={mode}"]))
    for seed in (0, 1):  # DMEA's ablations, transfer gated, ABCDE
        for name, extra in (("static-init", "method.expansion.init=static"),
                            ("random-sel", "method.selection.mode=random"),
                            ("no-gs", "method.adaptation.gradient_scaling=false")):
            groups["transfer"].append((f"abl-ABCDE-dmea-gated-{name}-s{seed}", f"dmea-gated-{name}", ORDERS["ABCDE"],
                                       "ABCDE", seed, ["method.name=dmea", "method.adaptation.transfer=gated", extra]))
    groups["synth10"] = [(f"synth10-dmea-s{seed}", "dmea", synth_config, "synth10", seed, ["method.name=dmea"])
                         for seed in (0, 1, 2)]
    # RESULTS "Selection along the earlier path": the new task's inputs read along each earlier task's path or
    # along its own, named explicitly (whatever the default): synth10 seeds 0-4, RNNLG+E2E seed 0, both orders
    groups["route"] = [(f"route-synth10-dmea-{r}-s{seed}", f"dmea, route {r}", synth_config, "synth10", seed,
                        ["method.name=dmea", f"method.selection.route={r}"]) for seed in (0, 1, 2, 3, 4)
                       for r in ("own", "earlier")]
    groups["route"] += [(f"route-{order}-dmea-{r}-s0", f"dmea, route {r}", cfg, order, 0,
                         ["method.name=dmea", f"method.selection.route={r}"])
                        for order, cfg in ORDERS.items() for r in ("own", "earlier")]
    # the same pairs on RNNLG+E2E seeds 1-3 (the earlier reading is the default since 9ed6783: main-*-dmea-s1..s3
    # compute the same runs)
    groups["route-s123"] = [(f"route-{order}-dmea-{r}-s{seed}", f"dmea, route {r}", cfg, order, seed,
                             ["method.name=dmea", f"method.selection.route={r}"])
                            for seed in (1, 2, 3) for order, cfg in ORDERS.items() for r in ("own", "earlier")]
    # the replay budget: dmea with method.adaptation.gamma 0.5 (the default, ACM's and LAMOL's, is 0.2), both
    # orders, seeds 0-3; compare with main-*-dmea-s*
    groups["gamma"] = [(f"gamma-{order}-dmea-0.5-s{seed}", "dmea, gamma 0.5", cfg, order, seed,
                        ["method.name=dmea", "method.adaptation.gamma=0.5"])
                       for seed in (0, 1, 2, 3) for order, cfg in ORDERS.items()]
    groups["gamma1"] = [(f"gamma-{order}-dmea-1.0-s{seed}", "dmea, gamma 1.0", cfg, order, seed,
                         ["method.name=dmea", "method.adaptation.gamma=1.0"])
                        for seed in (0, 1, 2, 3) for order, cfg in ORDERS.items()]
    groups["gamma-acm"] = [(f"gamma-{order}-acm-0.5-s{seed}", "acm, gamma 0.5", cfg, order, seed,
                            ["method.name=acm", "method.adaptation.gamma=0.5"])
                           for seed in (0, 1, 2, 3) for order, cfg in ORDERS.items()]
    # the pseudo-sample budget split the old way (one gamma * N over replayed and selected tasks alike), both
    # orders, seeds 0-3; compare with main-*-dmea-s* (replay's budget over the replayed tasks, RESULTS 0g)
    groups["split-all"] = [(f"split-{order}-dmea-all-s{seed}", "dmea, one budget for all", cfg, order, seed,
                            ["method.name=dmea", "method.adaptation.pseudo_split=all"])
                           for seed in (0, 1, 2, 3) for order, cfg in ORDERS.items()]
    for m, o in (("dmea", ["method.name=dmea"]), ("acm", ["method.name=acm"]),
                 ("dmea-no-gs", ["method.name=dmea", "method.adaptation.gradient_scaling=false"])):
        for seed in (0, 1, 2, 3, 4):
            groups["quickstart"].append((f"quickstart-{m}-s{seed}", m, "configs/quickstart.yaml", "qs", seed, o))
    for rows in ("frozen", "words"):  # the quick start's token rows (RESULTS section 2b)
        groups[f"quickstart-{rows}"] = [(f"quickstart-{m}-{rows}-s{seed}", f"{m}, rows {rows}", "configs/quickstart.yaml",
                                         "qs", seed, [f"method.name={m}", f"model.token_rows={rows}"])
                                        for seed in (0, 1, 2, 3, 4) for m in ("dmea", "acm")]
    for mode, name in (("off", "no-transfer"), ("gated", "gated-transfer")):  # transfer on the quick start
        for seed in (0, 1, 2):
            groups["quickstart-transfer"].append((f"quickstart-dmea-{name}-s{seed}", f"dmea-{name}",
                                                  "configs/quickstart.yaml", "qs", seed,
                                                  ["method.name=dmea", f"method.adaptation.transfer={mode}"]))
    return groups


def command(run: Run, code: Path, out: Path, data_root: str) -> list[str]:
    label, _, cfg, _, seed, overrides = run
    sets = [f"data.root={data_root}", f"output_dir={out / 'runs'}", "tracking.enabled=false",
            f"train.seed={seed}", *overrides]
    return [sys.executable, "-m", "dmea_dist.cli", "run", cfg, "--in-process",
            *(a for s in sets for a in ("--set", s)), "--run-dir", str(out / "runs" / label)]


def execute(run: Run, cmd: list[str], code: Path, out: Path) -> None:
    run_dir, log = out / "runs" / run[0], out / "logs" / f"{run[0]}.log"
    if (run_dir / "metrics.json").is_file():
        print(f"skip {run[0]} (done)", flush=True)
        return
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(code), "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    print(f"run  {run[0]}: {shlex.join(cmd)}", flush=True)
    start = time.time()
    with log.open("w") as fh:
        rc = subprocess.call(cmd, cwd=code, env=env, stdout=fh, stderr=subprocess.STDOUT)
    took = time.time() - start
    with log.open("a") as fh:
        fh.write(f"\n[results_sequences] rc={rc} process_wall_s={took:.1f}\n")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.txt").write_text(shlex.join(cmd) + f"\n# rc={rc} process_wall_s={took:.1f}\n")
    print(f"     {run[0]}: rc={rc}, {took:.0f}s", flush=True)


def load_run(run_dir: Path) -> dict | None:
    if not (run_dir / "metrics.json").is_file():
        return None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    records = [json.loads(p.read_text()) for p in sorted(run_dir.glob("tasks/*/record.json"))]
    records.sort(key=lambda r: r.get("task_index", 0))
    # state.json (the run's state since the durable-runs redesign) or lifecycle.json (older checkouts)
    life = next((p for p in (run_dir / "state.json", run_dir / "lifecycle.json") if p.is_file()), None)
    history = json.loads(life.read_text()).get("history", []) if life else []
    saved = run_dir / "command.txt"  # written by execute(): the command and the whole process's wall time
    proc = saved.read_text().rsplit("process_wall_s=", 1)[-1].strip() if saved.is_file() else ""
    saved_r = run_dir / "R.npy"  # R[j][i]: score on task i after task j
    return {"metrics": metrics, "records": records, "history": history,
            "proc": float(proc) if proc.replace(".", "").isdigit() else None,
            "R": np.load(saved_r) if saved_r.is_file() else None}


def fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def summarise(data: dict) -> dict:
    ms = [r["metrics"] for r in data["records"]]
    yields = [v for m in ms for k, v in m.items() if k.startswith("pseudo.yield.")]
    batches = [b for family in fidelity_by_family(data).values() for b in family]
    fids = [f for f, _ in batches]
    # the generating models' fidelity on real inputs, over the same batches (runs before 584ac1f lack it)
    real = [r for _, r in batches]
    clamps = [m["eta_clamp_rate"] for m in ms if "eta_clamp_rate" in m]
    met = data["metrics"]
    return {"A": met.get("final_average"), "bwt": met.get("bwt"), "fgt": met.get("forgetting"),
            "fwt": met.get("fwt"),
            # each task's score right after it was learned (None where a task was not evaluated then: multitask)
            "learned": float(np.diag(data["R"]).mean()) if data["R"] is not None
            and np.isfinite(np.diag(data["R"])).all() else None,
            "new": "/".join(str(int(m["new_modules"])) if "new_modules" in m else "-" for m in ms),
            "ymin": min(yields) if yields else None, "ymean": mean(yields) if yields else None,
            "fid": mean(fids) if fids else None,
            "real_fid": mean(real) if real and None not in real else None, "clamp": mean(clamps) if clamps else None,
            "wall": sum(h.get("seconds", 0.0) for h in data["history"]), "proc": data["proc"]}


def fidelity_by_family(data: dict) -> dict[str, list[tuple[float, float | None]]]:
    """Per family of the generated task (`synth.<family>.NN`), (pseudo fidelity, the generating model's
    fidelity on real inputs) of every pseudo-sample batch: a run's mean mixes tasks its model can do with
    tasks it cannot, whose pseudo samples cannot be faithful either."""
    from dmea_dist.data.synthetic import parse_synthetic_name
    out: dict[str, list[tuple[float, float | None]]] = {}
    for m in (r["metrics"] for r in data["records"]):
        for key, value in m.items():
            if key.startswith("pseudo.fidelity."):
                task = key.removeprefix("pseudo.fidelity.")
                family = parse_synthetic_name(task)[0] if task.startswith("synth.") else task
                out.setdefault(family, []).append((value, m.get(f"pseudo.real_fidelity.{task}")))
    return out


def _real(s: dict) -> str:
    return "" if s["real_fid"] is None else f" ({s['real_fid']:.2f})"


def precision_at_k(data: dict, k: int) -> tuple[float | None, list[tuple]]:
    from dmea_dist.data.synthetic import task_relatedness
    names = [r["task_id"] for r in data["records"]]
    rows, precs = [], []
    for n, rec in enumerate(data["records"]):
        related = [t for t in names[:n] if task_relatedness(t, names[n]) > 0]
        if n == 0 or not related:
            continue
        selected = rec.get("params", {}).get("selected", [])
        p = len(set(selected) & set(related)) / min(k, len(related))
        precs.append(p)
        rows.append((names[n], selected, related, p))
    return (mean(precs) if precs else None), rows


def _family(order: str) -> str:
    """The tables' sequence column: the quick start, synth10, or RNNLG+E2E (both orders)."""
    return order if order in ("qs", "synth10") else "rnnlg"


def paired(rows: list[tuple[str, int, str, dict]], reference: str = "dmea") -> dict[tuple[str, str], dict]:
    """Per (sequence, method), the differences method - `reference` over the (order, seed) pairs both ran.

    rows: (order, seed, method label, summary). Returns {(sequence, method): {"n": pairs, "A": (mean, sd,
    reference ahead), "bwt": (...), "n_A": pairs with A on both sides, "n_bwt": ...}}; sd is None for one pair.
    A pair whose figure is missing on either side is left out of that figure (and of its n_).
    """
    ref = {(o, seed): s for o, seed, m, s in rows if m == reference}
    out: dict[tuple[str, str], dict] = {}
    for order, seed, method, s in rows:
        other = ref.get((order, seed))
        if method == reference or other is None:
            continue
        entry = out.setdefault((_family(order), method), {"n": 0, "A": [], "bwt": []})
        entry["n"] += 1
        for key in ("A", "bwt"):
            if s[key] is not None and other[key] is not None:
                entry[key].append((s[key] - other[key], other[key] > s[key]))
    for entry in out.values():
        for key in ("A", "bwt"):
            diffs = [d for d, _ in entry[key]]
            entry[f"n_{key}"] = len(diffs)  # pairs with this figure on both sides: "ahead in k of n_key"
            entry[key] = (mean(diffs) if diffs else None, stdev(diffs) if len(diffs) > 1 else None,
                          sum(ahead for _, ahead in entry[key]))
    return out


def _pm(stat: tuple) -> str:
    m, sd, _ = stat
    return "-" if m is None else f"{m:+.2f}" + ("" if sd is None else f" +- {sd:.2f}")


def report(runs: list[Run], cmds: dict[str, list[str]], out: Path) -> None:
    print("\n| run | method | order | seed | A_T (ROUGE-L) | BWT | forgetting | FWT | new modules/task "
          "| yield min | yield mean | fidelity (on real inputs) | eta clamp | wall s | process s |\n"
          + "|---" * 15 + "|")
    done, summaries, per_method = [], [], {}
    for run in runs:
        data = load_run(out / "runs" / run[0])
        if data is None:
            print(f"| {run[0]} | {run[1]} | {run[3]} | {run[4]} | (not finished) |" + " |" * 10)
            continue
        s = summarise(data)
        done.append((run, data))
        summaries.append((run, s))
        per_method.setdefault((_family(run[3]), run[1]), []).append(s)
        print(f"| {run[0]} | {run[1]} | {run[3]} | {run[4]} | {fmt(s['A'])} | {fmt(s['bwt'])} | {fmt(s['fgt'])} "
              f"| {fmt(s['fwt'])} | {s['new']} | {fmt(s['ymin'])} | {fmt(s['ymean'])} | {fmt(s['fid'])}{_real(s)} "
              f"| {fmt(s['clamp'])} | {s['wall']:.0f} | {fmt(s['proc'], '.0f')} |")
    print("\nCommands (run from the code directory, env PYTHONPATH=<code> DS_ACCELERATOR=cpu "
          "TOKENIZERS_PARALLELISM=false):\n")
    for run, _ in done:
        saved = out / "runs" / run[0] / "command.txt"
        cmd = saved.read_text().splitlines()[0] if saved.is_file() else shlex.join(cmds[run[0]])
        print(f"- `{run[0]}`: `{cmd}`")
    print("\nSummary: per method, mean over the orders and seeds it ran on\n\n"
          "| sequence | method | runs | A_T | BWT | forgetting | FWT | learned | yield mean | eta clamp | wall s |\n"
          + "|---" * 11 + "|")
    def col(ss: list[dict], key: str) -> float | None:
        xs = [s[key] for s in ss if s[key] is not None]
        return mean(xs) if xs else None

    for (seq, m), ss in per_method.items():
        print(f"| {seq} | {m} | {len(ss)} | {fmt(col(ss, 'A'))} | {fmt(col(ss, 'bwt'))} | {fmt(col(ss, 'fgt'))} "
              f"| {fmt(col(ss, 'fwt'))} | {fmt(col(ss, 'learned'))} | {fmt(col(ss, 'ymean'))} | {fmt(col(ss, 'clamp'))} | {fmt(col(ss, 'wall'), '.0f')} |")
    by_family: dict[tuple[str, str, str], list[tuple[float, float | None]]] = {}
    for run, data in done:
        for family, batches in fidelity_by_family(data).items():
            by_family.setdefault((_family(run[3]), run[1], family), []).extend(batches)
    if by_family:
        print("\nPseudo-sample fidelity by the generated task's family: every batch of the method's runs; on real "
              "inputs: the generating model's answers to the same task's real inputs (the most its samples can "
              "reach)\n\n| sequence | method | family | batches | fidelity mean | min | on real inputs |\n"
              + "|---" * 7 + "|")
        for (seq, m, family), batches in by_family.items():
            fid = [f for f, _ in batches]
            real = [r for _, r in batches if r is not None]
            print(f"| {seq} | {m} | {family} | {len(fid)} | {mean(fid):.2f} | {min(fid):.2f} "
                  f"| {fmt(mean(real) if len(real) == len(fid) else None)} |")
    pairs = paired([(run[3], run[4], run[1], s) for run, s in summaries])
    if pairs:
        print("\nPaired against dmea (same sequence, order and seed): the other method minus dmea, mean +- standard "
              "deviation of the differences (standard error = sd / sqrt(pairs)); 'dmea ahead' counts the pairs where "
              "dmea's figure is higher\n\n| sequence | method | pairs | A_T diff | BWT diff | dmea ahead (A_T, BWT) |\n"
              + "|---" * 6 + "|")
        for (seq, m), p in pairs.items():
            print(f"| {seq} | {m} | {p['n']} | {_pm(p['A'])} | {_pm(p['bwt'])} | {p['A'][2]} of {p['n_A']}, "
                  f"{p['bwt'][2]} of {p['n_bwt']} |")
    for run, data in done:
        if run[3] != "synth10":
            continue
        cfg = yaml.safe_load((out / "runs" / run[0] / "config.yaml").read_text())
        k = int(cfg["method"]["selection"]["top_k"])
        p, rows = precision_at_k(data, k)
        print(f"\nSelection precision@{k} ({run[0]}, ground truth: task_relatedness > 0): mean {fmt(p)}\n\n"
              "| task | selected | related earlier | precision |\n|---|---|---|---|")
        for name, sel, rel, prec in rows:
            print(f"| {name} | {', '.join(sel) or '-'} | {', '.join(rel)} | {prec:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="quickstart,main,ablations,synth10", help="comma-separated groups")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout to run (PYTHONPATH and cwd)")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "results", help="runs/ and logs/ go here")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--synth-config", help="default: CODE/configs/synth10_tiny.yaml, else this repo's")
    ap.add_argument("--labels", help="comma-separated run labels: of the chosen groups' runs, only these, in this order")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--report-only", action="store_true", help="run nothing, print the tables")
    args = ap.parse_args()
    code = args.code.resolve()
    synth = args.synth_config or next(str(p) for p in (code / "configs/synth10_tiny.yaml",
                                                       REPO / "configs/synth10_tiny.yaml") if p.is_file())
    groups = matrix(synth)
    unknown = [g for g in args.only.split(",") if g not in groups]
    if unknown:
        ap.error(f"unknown groups {unknown}; choose from {', '.join(groups)}")
    runs = list({r[0]: r for g in args.only.split(",") for r in groups[g]}.values())  # in order, no repeats
    if args.labels:
        by_label = {r[0]: r for r in runs}
        missing = [x for x in args.labels.split(",") if x not in by_label]
        if missing:
            ap.error(f"--labels {missing} are not runs of --only {args.only}; --dry-run lists them")
        runs = [by_label[x] for x in args.labels.split(",")]
    cmds = {r[0]: command(r, code, args.out, args.data_root) for r in runs}
    if args.dry_run:
        for r in runs:
            print(f"{r[0]}: cd {code} && PYTHONPATH={code} DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false "
                  f"{shlex.join(cmds[r[0]])}")
        return
    if not args.report_only:
        for r in runs:
            execute(r, cmds[r[0]], code, args.out)
    sys.path.insert(0, str(code))
    report(runs, cmds, args.out)


if __name__ == "__main__":
    main()
