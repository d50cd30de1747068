"""The `dmea` command.

    dmea run CONFIG [--set key=value ...]   run a whole task sequence
    dmea resume RUN_DIR                     continue a stopped or killed run where it stopped
    dmea data list                          the tasks the registry knows
    dmea data show TASK                     split sizes, formatted examples, token lengths
    dmea model summary CONFIG               the backbone, its modules and parameter counts
    dmea generate RUN_DIR TASK CONTEXT...   answer inputs with any recorded task of a run

Errors caused by input (config, data) print one clear line and exit 2; no
traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from dmea_dist.errors import DmeaError

DEFAULT_DATA_ROOT = "../shared/data"


def _data_config(args):
    """The run config a `dmea data` command reads its data settings from (--config), or None."""
    if not args.config:
        return None
    from dmea_dist.config import load_config

    return load_config(args.config)


def _data_root(args, config) -> str:
    """--data-root, else the config's data.root, else data.root's default: what `dmea run` would read."""
    return args.data_root or (config.data.root if config else DEFAULT_DATA_ROOT)


def cmd_data_list(args) -> int:
    from dmea_dist.data.registry import list_tasks

    config = _data_config(args)
    root = _data_root(args, config)
    infos = list_tasks(data_root=root, user_tasks=config.data.user_tasks if config else {})
    print(f"data root: {root} (= {Path(root).resolve()}{'' if Path(root).is_dir() else ', not found'})")
    width = max(len(i.name) for i in infos)
    for info in infos:
        flag = "" if info.available else "  (files not found)"
        print(f"{info.name:<{width}}  {info.kind:<9}  {info.description}{flag}")
    return 0


def cmd_data_show(args) -> int:
    from dmea_dist.data.formatting import Formatter
    from dmea_dist.data.registry import load_task
    from dmea_dist.data.tokenizer import load_pretrained_tokenizer, train_bpe_tokenizer

    config = _data_config(args)
    synth = {"synth_seed": config.data.synth_seed, "synth_sizes": config.data.synth_sizes} if config else {}
    if args.seed is not None:
        synth["synth_seed"] = args.seed
    if args.max_length is None:
        args.max_length = config.model.max_length if config else 128
    data = load_task(args.task, data_root=_data_root(args, config), user_tasks=config.data.user_tasks if config else {},
                     **synth)
    print(f"task {args.task}")
    for split in ("train", "validation", "test"):
        refs = [len(a) for a in data[split]["answer"]]
        print(f"  {split:<10} {len(data[split]):>6} inputs  {sum(refs):>6} references")
    train = data["train"]
    if args.tokenizer:
        tokenizer = load_pretrained_tokenizer(args.tokenizer, max_tasks=1)
    else:
        texts = [f"{r['context']} {r['question']} {a}" for r in train for a in r["answer"]]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=args.vocab_size, max_tasks=1)
    fmt = Formatter(tokenizer, max_length=args.max_length)
    lengths = [len(fmt.lm_example(r["context"], r["question"], r["answer"][0], task_index=0).input_ids)
               for r in train]
    print(f"  tokens per LM example ({'tokenizer ' + args.tokenizer if args.tokenizer else f'BPE {args.vocab_size} trained on this task'}): "
          f"min {min(lengths)}  mean {statistics.mean(lengths):.1f}  max {max(lengths)}  "
          f"truncated at {args.max_length}: {fmt.truncated}")
    for row in train.select(range(min(args.n, len(train)))):
        ex = fmt.lm_example(row["context"], row["question"], row["answer"][0], task_index=0)
        print("\n  row:      " + repr({k: row[k] for k in ("context", "question", "answer")}))
        print("  formatted: " + tokenizer.decode(ex.input_ids))
    return 0


def cmd_model_summary(args) -> int:
    import tempfile

    from dmea_dist.config import load_config
    from dmea_dist.run import build_run

    config = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(config, run_dir=tmp)
    model = run.model
    model.add_modules()
    backbone = sum(p.numel() for p in model.backbone.parameters() if not _is_adapter(p, model))
    module = sum(p.numel() for p in model.trainable_parameters([model.module_ids(layer)[0] for layer in range(model.n_layers)]))
    cfg = model.backbone.config
    print(f"backbone: {config.model.pretrained or 'tiny GPT-2'}  layers={cfg.n_layer} d_model={cfg.n_embd} "
          f"heads={cfg.n_head} positions={cfg.n_positions} vocab={cfg.vocab_size}")
    print(f"  frozen backbone parameters: {backbone:,}")
    print(f"  one module in every layer (2 adapters, bottleneck {model.bottleneck}): {module:,} "
          f"({100 * module / backbone:.2f}% of the backbone)")
    print(f"tasks ({len(run.tasks)}): " + ", ".join(f"{t.task_id} [{len(t.rows['train'])} train]" for t in run.tasks))
    print(f"method: {config.method.name}")
    return 0


def _is_adapter(param, model) -> bool:
    return any(param is p for pool in model.pools for p in pool.parameters())


def cmd_run(args) -> int:
    from dmea_dist.config import load_config
    from dmea_dist.driver import check_input, run_sequence

    config = load_config(args.config, args.set)
    check_input(config)  # before Ray starts: on Ray, build_run's errors would come back as Ray tracebacks
    factory = None if args.in_process else _ray(args.address or config.ray.address, config.ray)
    with _tracking_reported(config):
        run_sequence(config, run_dir=args.run_dir, progress=not args.quiet, coordinator_factory=factory,
                     check=False)
    return 0


def cmd_resume(args) -> int:
    from dmea_dist.driver import resume_config, resume_sequence
    from dmea_dist.tracking import check_store

    config = resume_config(Path(args.run_dir), args.set)  # refuses unsafe changes before Ray starts
    if config.tracking.enabled:
        check_store(uri=config.tracking.uri, experiment=config.tracking.experiment)
    factory = None if args.in_process else _ray(args.address or config.ray.address, config.ray)
    with _tracking_reported(config):
        resume_sequence(args.run_dir, overrides=args.set, progress=not args.quiet, coordinator_factory=factory)
    return 0


@contextlib.contextmanager
def _tracking_reported(config):
    """Count the run's tracking failures (each warns as it happens) and say at the end what they cost."""
    import warnings

    from dmea_dist.errors import DataWarning
    from dmea_dist.tracking import count_failures, failures_summary

    with count_failures() as failures:
        warnings.simplefilter("ignore", DataWarning)  # check_input printed them already
        try:
            yield
        finally:
            summary = failures_summary(failures, uri=config.tracking.uri)
            if summary:
                print(f"WARNING: {summary}", file=sys.stderr)


def _ray(address: str | None, sizes):
    """Join Ray (embedded by default; `sizes`: the config's `ray:` section) and return the coordinator factory."""
    from dmea_dist.distributed.cluster import logical_cpus
    from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory

    where = connect(address, num_cpus=sizes.num_cpus or logical_cpus(sizes))
    print(f"ray: {'embedded local cluster' if where == 'local' else where}", file=sys.stderr)
    return ray_coordinator_factory


def cmd_generate(args) -> int:
    from dmea_dist.serving import answer

    for context, out in zip(args.context, answer(args.run_dir, args.task, args.context, question=args.question,
                                                 decoding=args.decoding, max_new_tokens=args.max_new_tokens),
                            strict=True):
        print(f"{context}\n  -> {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmea", description="Lifelong sequence generation with DMEA on GPT-2.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole task sequence from a YAML config")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    run.add_argument("--run-dir", help="where the run's files go (default: output_dir/name-timestamp)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--address", help="join this Ray cluster (default: ray.address, $RAY_ADDRESS, else embedded)")
    run.add_argument("--in-process", action="store_true",
                     help="run every stage in this process, without Ray (debugging, tests)")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a stopped, failed or killed run from its last finished stage")
    resume.add_argument("run_dir", help="the run directory `dmea run` printed")
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a value that is safe to change (ray.*); anything else is refused")
    resume.add_argument("--quiet", action="store_true", help="no progress output")
    resume.add_argument("--address", help="join this Ray cluster (default: ray.address, $RAY_ADDRESS, else embedded)")
    resume.add_argument("--in-process", action="store_true", help="run every stage in this process, without Ray")
    resume.set_defaults(func=cmd_resume)

    gen = sub.add_parser("generate", help="answer inputs with a recorded task of a run")
    gen.add_argument("run_dir", help="the run directory `dmea run` printed")
    gen.add_argument("task", help="a task of that run, e.g. synth.restaurant.00")
    gen.add_argument("context", nargs="+", help="one or more inputs (e.g. an MR)")
    gen.add_argument("--question", default="")
    gen.add_argument("--decoding", choices=["greedy", "top_k"], default="greedy")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.set_defaults(func=cmd_generate)

    data = sub.add_parser("data", help="inspect task data").add_subparsers(dest="data_command", required=True)
    for name, func, helptext in (("list", cmd_data_list, "list known tasks"),
                                 ("show", cmd_data_show, "show one task's splits and examples")):
        p = data.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("task")
            p.add_argument("-n", type=int, default=3, help="formatted examples to print")
            p.add_argument("--tokenizer", help="a pretrained tokenizer (local dir or hub name)")
            p.add_argument("--vocab-size", type=int, default=1000)
            p.add_argument("--max-length", type=int, help="tokens per example (default: the config's, else 128)")
            p.add_argument("--seed", type=int, help="seed of synthetic tasks (default: the config's, else 0)")
        p.add_argument("--data-root", help=f"real corpora folder (default: the config's data.root, else "
                                           f"{DEFAULT_DATA_ROOT})")
        p.add_argument("--config", help="a run config whose data settings (data.root, user tasks) to use")
        p.set_defaults(func=func)

    model = sub.add_parser("model", help="inspect the model").add_subparsers(dest="model_command", required=True)
    summary = model.add_parser("summary", help="backbone and module sizes of a config")
    summary.add_argument("config")
    summary.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    summary.set_defaults(func=cmd_model_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DmeaError as err:
        from dmea_dist.driver import RunStopped

        # An error raised in a Ray task comes back as RayTaskError(<its class>), whose str is a traceback;
        # the error itself is its `cause`.
        err = err.cause if isinstance(getattr(err, "cause", None), DmeaError) else err
        print(f"{'stopped' if isinstance(err, RunStopped) else 'error'}: {err}", file=sys.stderr)
        return 130 if isinstance(err, RunStopped) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
