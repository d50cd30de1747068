"""Wall time of the quick start as a user runs it (`dmea run configs/quickstart.yaml`), variants side by side.

Each run is the whole CLI command in a fresh process: imports, input checks, embedded Ray, the coordinator,
every stage, MLflow (a fresh SQLite store per run) and the reports. The backbone cache under
`output_dir/_cache` (default: the quick start's, runs/_cache) is filled first if there is none (one run, not
counted), so every timed run is meant to be a warm start; a `_cache` that exists but holds no backbone for this
code and config (made by other code: the key changes with it) is not refilled, so a timed run that says it
pretrains is marked "(pretrained: not warm)" and left out of the means. `--cold` also times one run with an
empty cache first (one per checkout). Compared checkouts each get a cache of their own, filled by an untimed (or the cold) run. Variants
alternate (A B A B ...) so that drift of a shared machine hits both alike.

    python benchmarks/bench_quickstart.py                 # the default against one search worker
    python benchmarks/bench_quickstart.py --repeats 3 --cold
    python benchmarks/bench_quickstart.py --variants "default,virtual shards 4"
    python benchmarks/bench_quickstart.py --code ../before,.      # two checkouts (e.g. git worktrees)
    python benchmarks/bench_quickstart.py --variants default --store kept   # as a user's repeated runs

Each run records into a new SQLite MLflow store by default (`--store new`): creating its tables costs
~1.5 s more than opening the store a user's second run finds (`--store kept`: one store per checkout,
kept across its runs, as `dmea run` in one directory keeps `mlflow.db`).

A checkout runs with it as working directory and PYTHONPATH: Ray workers put the driver's working
directory first on sys.path, so PYTHONPATH alone would run the checkout's driver with the workers of
whichever checkout the shell is in.

Prints one row per run (wall s, when the first stage started, the stage seconds the run reported) and the
mean per variant.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": [],  # on an embedded Ray: one search worker per core, search and generation on one pool
    "separate pools": ["ray.shared_replicas=false"],  # a search pool beside a generation pool
    "one search worker": ["ray.num_search_workers=1"],
    "virtual shards 4": ["train.virtual_shards=4"],  # adaptation over 4 fixed pieces per batch (dmea_dist.engine)
    "dashboard": ["ray.dashboard=true"],  # Ray's dashboard, off by default where the run does not need it
}
STAGE = re.compile(r"\] \S+ (expand|select|generate|adapt|evaluate|record) done after ([0-9.]+)s")
FIRST_STAGE = re.compile(r"^\[1/\d+\] \S+ expand$")  # the plain progress line the first stage starts with
PRETRAINS = "pretraining the tiny backbone"  # what a run says when its backbone is not in the cache


def warm_label(name: str, text: str) -> str:
    """The row name of a timed run meant to be warm: marked apart (and so out of the warm means) where the run
    pretrained anyway, as it does when --output-dir's _cache holds no backbone for this code and config."""
    return f"{name} (pretrained: not warm)" if PRETRAINS in text else name


def run_once(config: str, sets: list[str], work: Path, output_dir: Path, code: Path = REPO,
             store: Path | None = None) -> tuple[float, dict[str, float], str, float, str]:
    """(wall s, stage s summed by stage, the final metrics line, s until the first stage started, the output) of one
    `dmea run` in a fresh process, on the checkout `code` (working directory and PYTHONPATH), recording into
    the SQLite file `store` (default: a new one in `work`)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    cmd = [str(Path(sys.executable).parent / "dmea"), "run", config, "--run-dir", str(work / "run"),
           "--set", f"output_dir={output_dir}", "--set", f"tracking.uri=sqlite:///{store or work / 'mlflow.db'}"]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(code)}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    marks: dict[str, float] = {}

    def read_stderr() -> None:  # as it comes, to time the start-up: process start to the first stage
        for line in proc.stderr:
            if FIRST_STAGE.match(line.strip()):
                marks.setdefault("first stage", time.perf_counter() - start)
            err.append(line)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    stdout = proc.stdout.read()
    proc.wait()
    reader.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(err)[-3000:]}")
    text = stdout + "".join(err)
    stages: dict[str, float] = {}
    for name, seconds in STAGE.findall(text):
        stages[name] = stages.get(name, 0.0) + float(seconds)
    final = next((line.strip() for line in text.splitlines() if line.startswith("final_average=")), "")
    return wall, stages, final, marks.get("first stage", float("nan")), text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per variant")
    ap.add_argument("--cold", action="store_true", help="also time one run that pretrains the backbone")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--code", default=None,
                    help="comma-separated checkouts to compare, each on the default settings (instead of --variants)")
    ap.add_argument("--output-dir", type=Path, default=REPO / "runs",
                    help="output_dir of the runs, whose _cache holds the backbone (default: the quick start's)")
    ap.add_argument("--store", choices=("new", "kept"), default="new",
                    help="MLflow store of each warm run: a new one, or one per checkout kept across its runs")
    args = ap.parse_args()
    # what each compared run is: (its --set overrides, the checkout it runs)
    if args.code:
        runs = {c: ([], Path(c).resolve()) for c in args.code.split(",")}
    else:
        runs = {name: (VARIANTS[name], REPO) for name in args.variants.split(",")}
    names = list(runs)
    root = Path(tempfile.mkdtemp(prefix="bench-quickstart-"))
    # the backbone cache of each run: one per checkout where checkouts are compared (their code may key or
    # make the backbone differently) or cold runs are timed, else --output-dir's
    separate = bool(args.code) or args.cold
    caches = {code: (root / f"out-{i}" if separate else args.output_dir)
              for i, code in enumerate(dict.fromkeys(code for _, code in runs.values()))}
    stores = {code: (root / f"store-{i}" / "mlflow.db" if args.store == "kept" else None)
              for i, code in enumerate(caches)}
    for store in filter(None, stores.values()):
        store.parent.mkdir(parents=True)
    rows = []
    filled: set[Path] = set()
    for name in names:
        sets, code = runs[name]
        if code in filled:
            continue
        filled.add(code)
        if args.cold:  # an empty cache: this run pretrains the backbone
            wall, stages, final, first, _ = run_once(args.config, sets, root / "cold", caches[code], code,
                                                     stores[code])  # a user's first run: it creates a kept store
            rows.append((f"{name} (cold: pretrains)", wall, stages, final, first))
            print(f"  {name} (cold): {wall:.1f} s", file=sys.stderr, flush=True)
        elif separate or not (caches[code] / "_cache").is_dir() or stores[code]:
            # fills the cache (and a kept store: warm runs find it as a user's second run does), not counted
            run_once(args.config, sets, root / "warm-cache", caches[code], code, stores[code])
    for _ in range(args.repeats):
        for name in names:
            sets, code = runs[name]
            wall, stages, final, first, text = run_once(args.config, sets, root / "run", caches[code], code,
                                                        stores[code])
            label = warm_label(name, text)
            rows.append((label, wall, stages, final, first))
            print(f"  {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    shutil.rmtree(root, ignore_errors=True)

    order = ["expand", "generate", "adapt", "evaluate"]
    print(f"| variant | wall s | first stage at s | {' | '.join(order)} | stages s | outside stages s | result |")
    print("| --- " * (len(order) + 6) + "|")
    for name, wall, stages, final, first in rows:
        total = sum(stages.values())
        print(f"| {name} | {wall:.1f} | {first:.1f} | " + " | ".join(f"{stages.get(k, 0.0):.1f}" for k in order)
              + f" | {total:.1f} | {wall - total:.1f} | {final} |")
    print()
    for name in names:
        walls = [w for n, w, _, _, _ in rows if n == name]  # warm runs only: cold rows are named apart
        if not walls:
            continue
        print(f"{name}: mean {statistics.mean(walls):.1f} s over {len(walls)} warm runs "
              f"(min {min(walls):.1f}, max {max(walls):.1f})")
    if len(names) == 2:
        a, b = ([w for n, w, _, _, _ in rows if n == x] for x in names)
        if a and b:
            print(f"{names[1]} / {names[0]}: {statistics.mean(b) / statistics.mean(a):.2f}x")


if __name__ == "__main__":
    main()
