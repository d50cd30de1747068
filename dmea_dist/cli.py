"""The `dmea` command.

    dmea run CONFIG [--set key=value ...]   run a whole task sequence
    dmea resume RUN_DIR                     continue a stopped or killed run where it stopped
    dmea data list                          the tasks the registry knows
    dmea data show TASK                     split sizes, formatted examples, token lengths
    dmea model summary CONFIG               the backbone, its modules and parameter counts
    dmea generate SOURCE [TASK] INPUT...    answer inputs with recorded tasks (run dir, run id, models:/)
    dmea generate SOURCE --input FILE       ... a JSONL/CSV file of inputs, several tasks in one batch
    dmea report RUN_DIR [RUN_DIR ...]       the Markdown/HTML report of a run, or a comparison of runs

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

from dmea_dist.errors import DataError, DmeaError
from dmea_dist.offline import no_downloads
from dmea_dist.stops import exit_on_termination

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
    try:
        data = load_task(args.task, data_root=_data_root(args, config),
                         user_tasks=config.data.user_tasks if config else {}, **synth)
    except DataError as err:
        if config is None and str(err).startswith("unknown task"):  # a user task, shown without its config
            raise DataError(f"{err} (dmea data reads them from --config CONFIG)") from None
        raise
    print(f"task {args.task}")
    for split in ("train", "validation", "test"):
        refs = [len(a) for a in data[split]["answer"]]
        print(f"  {split:<10} {len(data[split]):>6} inputs  {sum(refs):>6} references")
    train = data["train"]
    if args.tokenizer:
        tokenizer = load_pretrained_tokenizer(args.tokenizer, max_tasks=1, key="--tokenizer")
        source = f"tokenizer {args.tokenizer}"
    elif config is not None and not args.vocab_size:  # the lengths `dmea run CONFIG` checks against max_length
        tokenizer, source = _config_tokenizer(config)
    else:
        vocab_size = args.vocab_size or 1000
        texts = [f"{r['context']} {r['question']} {a}" for r in train for a in r["answer"]]
        tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size, max_tasks=1)
        source = f"BPE {vocab_size} trained on this task"
    fmt = Formatter(tokenizer, max_length=args.max_length)
    lengths = [len(fmt.lm_example(r["context"], r["question"], r["answer"][0], task_index=0).input_ids)
               for r in train]
    print(f"  tokens per LM example ({source}): "
          f"min {min(lengths)}  mean {statistics.mean(lengths):.1f}  max {max(lengths)}  "
          f"truncated at {args.max_length}: {fmt.truncated}")
    for row in train.select(range(min(args.n, len(train)))):
        ex = fmt.lm_example(row["context"], row["question"], row["answer"][0], task_index=0)
        print("\n  row:      " + repr({k: row[k] for k in ("context", "question", "answer")}))
        print("  formatted: " + tokenizer.decode(ex.input_ids))
    return 0


def _config_tokenizer(config) -> tuple:
    """(the tokenizer a run of `config` encodes with, what it is): the checkpoint's, or the tiny backbone's BPE
    of the config's tasks and pretraining text (a BPE of one task alone counts far fewer tokens: 31 instead of
    the run's 77 for a user task of unicode text, so a max_length it passed failed the run)."""
    from dmea_dist.data.tokenizer import load_pretrained_tokenizer
    from dmea_dist.run import load_tasks, tiny_tokenizer

    m = config.model
    if m.pretrained:
        return load_pretrained_tokenizer(m.pretrained, max_tasks=m.max_tasks), f"the tokenizer of {m.pretrained}"
    return (tiny_tokenizer(config, load_tasks(config)),
            f"the run's tokenizer: BPE {m.tiny.vocab_size} of the config's tasks and pretraining text")


def cmd_model_summary(args) -> int:
    import tempfile
    import warnings

    from dmea_dist.config import load_config
    from dmea_dist.errors import DataWarning
    from dmea_dist.run import build_run

    config = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", DataWarning)
        run = build_run(config, run_dir=tmp)
    for warning in said:  # as `dmea run` says them: one line each, not Python's file:line and source line
        if issubclass(warning.category, DataWarning):
            print(f"warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
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
    from dmea_dist.driver import command_started, run_sequence
    from dmea_dist.preflight import check_input

    config = load_config(args.config, args.set)
    check_input(config)  # before Ray starts: on Ray, build_run's errors would come back as Ray tracebacks
    factory = None
    if not args.in_process:
        config, factory = _ray(args.address or config.ray.address, config)
    with _tracking_reported(config):
        run_sequence(config, run_dir=args.run_dir, progress=not args.quiet, coordinator_factory=factory,
                     check=False, started=command_started())
    return 0


def cmd_resume(args) -> int:
    from dmea_dist.driver import command_started, resume_sequence
    from dmea_dist.preflight import check_resume, resume_config, run_lock
    from dmea_dist.state import load_state

    config = resume_config(Path(args.run_dir), args.set)  # refuses unsafe changes before Ray starts
    check_resume(args.run_dir, config)
    # a run still running (another `dmea run` or `dmea resume` of it) is refused now, not after Ray started
    with run_lock(Path(args.run_dir), resume=True):
        factory, overrides = None, list(args.set)
        # a finished run has no stage left: its results (and any record a kill left out) need no Ray
        if not args.in_process and not load_state(args.run_dir).done:
            from dmea_dist.distributed.cluster import size_overrides

            sized, factory = _ray(args.address or config.ray.address, config)
            overrides += size_overrides(config.ray, sized.ray)  # a run started in process has no sizes yet
        with _tracking_reported(config):
            resume_sequence(args.run_dir, overrides=overrides, progress=not args.quiet, coordinator_factory=factory,
                            check=False, saved=list(args.set),  # not the sizes this cluster gave unset keys
                            started=command_started())
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


def _ray(address: str | None, config):
    """Join Ray (embedded by default) and return (the config with its Ray sizes set for it, the coordinator
    factory): on an embedded Ray, one search worker per core unless the config says (`RayConfig.sized`)."""
    import dataclasses

    import ray

    from dmea_dist.distributed.cluster import (
        capacity_note,
        logical_cpus,
        ray_dashboard_url,
        sized_for,
    )
    from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory

    s = sized_for(config.ray, address)
    where = connect(address, num_cpus=logical_cpus(s), dashboard=s.dashboard)
    dashboard = ""
    if where == "local":
        dashboard = f"; dashboard: {ray_dashboard_url() or 'off (--set ray.dashboard=true starts it)'}"
    print(f"ray: {'embedded local cluster' if where == 'local' else where} ({s.layout()}){dashboard}",
          file=sys.stderr)
    if where != "local" and (note := capacity_note(s, ray.cluster_resources(), stop="Ctrl-C")):
        print(f"warning: {note}", file=sys.stderr, flush=True)  # now, not after the pools' wait
    return dataclasses.replace(config, ray=s), ray_coordinator_factory


def cmd_generate(args) -> int:
    import json

    from transformers.utils import logging as transformers_logging

    from dmea_dist.serving import load_task_model, read_inputs

    # the answers are the output: no bars for loading weights or fetching a recorded model
    transformers_logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    task, texts = _generate_task_and_inputs(args)
    rows = [{"context": text, "question": args.question} for text in texts]
    if args.input:
        rows += read_inputs(args.input)
    if not rows:
        raise DmeaError("no inputs: give contexts after the task, or --input FILE (JSONL or CSV)")
    named = [r["task"] for r in rows if r.get("task")]
    served = load_task_model(args.source, task, tasks=list(dict.fromkeys(named)) or None,
                             tracking_uri=args.tracking_uri)
    answers = served.generate(rows, decoding=args.decoding, max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                              batch_size=args.batch_size, seed=args.seed)
    out = open(args.output, "w") if args.output else sys.stdout  # noqa: SIM115 - closed below unless stdout
    try:
        jsonl = (args.format or ("jsonl" if args.input or args.output else "text")) == "jsonl"
        for row, checked, answer in zip(rows, served.rows(rows), answers, strict=True):
            if jsonl:
                out.write(json.dumps({**checked, "answer": answer}) + "\n")
            else:
                where = f"[{checked['task']}] " if len(served.tasks) > 1 else ""
                out.write(f"{where}{row['context']}\n  -> {answer}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _generate_task_and_inputs(args) -> tuple[str | None, list[str]]:
    """(default task, contexts): the first positional is the task unless --task, --input or a models:/ URI says it."""
    if args.task or args.input or args.source.startswith("models:/"):
        return args.task, list(args.items)
    if not args.items:
        raise DmeaError("dmea generate SOURCE TASK INPUT...: name the task (or use --task / --input FILE)")
    return args.items[0], list(args.items[1:])


def cmd_report(args) -> int:
    from dmea_dist.evaluation.pages import write_report

    try:
        written = write_report([Path(p) for p in args.run_dirs], out=Path(args.out) if args.out else None)
    except OSError as err:  # a read-only run folder (a colleague's, an archive), --out naming a file, a full disk
        where = err.filename or args.out or args.run_dirs[0]
        raise DmeaError(f"could not write the report: {err.strerror or err}: {where}; pass --out DIR to write it "
                        f"to another folder") from err
    print(f"report: {written.html}\n        {written.markdown} ({len(written.images)} figures in {written.figures})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dmea", description="Lifelong sequence generation with DMEA on GPT-2.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a whole task sequence from a YAML config")
    run.add_argument("config")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    run.add_argument("--run-dir", help="where the run's files go (default: output_dir/<name>-<time>-<xxxx>)")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    run.add_argument("--address", help="join this Ray cluster (default: ray.address, $RAY_ADDRESS, else embedded)")
    run.add_argument("--in-process", action="store_true",
                     help="run every stage in this process, without Ray (debugging, tests)")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue a stopped, failed or killed run from its last finished stage")
    resume.add_argument("run_dir", help="the run directory `dmea run` printed")
    resume.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a value that is safe to change (ray.*, data.root, output_dir, "
                             "tracking.uri), saved in the run's config.yaml for later resumes; anything else is refused")
    resume.add_argument("--quiet", action="store_true", help="no progress output")
    resume.add_argument("--address", help="join this Ray cluster (default: ray.address, $RAY_ADDRESS, else embedded)")
    resume.add_argument("--in-process", action="store_true", help="run every stage in this process, without Ray")
    resume.set_defaults(func=cmd_resume)

    gen = sub.add_parser("generate", help="answer inputs with recorded tasks of a run (run dir, run id, models:/)",
                         description="Answer inputs with recorded tasks. SOURCE: a run directory, an MLflow run "
                                     "id (runs:/ID too), or a registered task model models:/NAME@ALIAS. Forms: "
                                     "`dmea generate SOURCE TASK INPUT...`, `dmea generate models:/NAME@ALIAS "
                                     "INPUT...`, `dmea generate SOURCE --input FILE [--task TASK]` (JSONL or CSV "
                                     "rows with context[, question][, task]: rows of several tasks share batches).")
    gen.add_argument("source", help="run directory, MLflow run id, or models:/NAME@ALIAS")
    gen.add_argument("items", nargs="*", metavar="[TASK] INPUT",
                     help="the task (unless --task, --input or a models:/ URI names it), then inputs (contexts)")
    gen.add_argument("--task", help="the task of inputs that name none")
    gen.add_argument("--input", "-i", help="a JSONL or CSV file of inputs: context[, question][, task]")
    gen.add_argument("--output", "-o", help="write the answers here as JSONL (default: stdout)")
    gen.add_argument("--format", choices=["text", "jsonl"],
                     help="text (context -> answer) or jsonl (default: jsonl for --input/--output, else text)")
    gen.add_argument("--question", default="", help="question of the positional inputs")
    gen.add_argument("--decoding", choices=["greedy", "top_k"], default="greedy")
    gen.add_argument("--top-k", type=int, help="k of top_k decoding (default: the run's eval.top_k)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--batch-size", type=int, help="inputs per batch (default: the run's eval.batch_size)")
    gen.add_argument("--seed", type=int, default=0, help="seed of top_k decoding")
    gen.add_argument("--tracking-uri", help="MLflow store of a run id or models:/ URI "
                                            "(default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    gen.set_defaults(func=cmd_generate)

    rep = sub.add_parser("report", help="write the Markdown/HTML report of one run, or compare several",
                         description="Reads everything from the run directories (state.json, tasks/*/record.json, "
                                     "R.npy, metrics.json), so it works on any finished or stopped run.")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", help="folder for report.html, report.md and report_files/ (default: the run "
                                   "directory for one run; ./dmea-report-<time> for several)")
    rep.set_defaults(func=cmd_report)

    data = sub.add_parser("data", help="inspect task data").add_subparsers(dest="data_command", required=True)
    for name, func, helptext in (("list", cmd_data_list, "list known tasks"),
                                 ("show", cmd_data_show, "show one task's splits and examples")):
        p = data.add_parser(name, help=helptext)
        if name == "show":
            p.add_argument("task")
            p.add_argument("-n", type=int, default=3, help="formatted examples to print")
            p.add_argument("--tokenizer", help="a pretrained tokenizer (local dir or hub name)")
            p.add_argument("--vocab-size", type=int,
                           help="a BPE of this size trained on this task alone (default without --config: 1000; "
                                "with --config: the tokenizer the config's run uses)")
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
    no_downloads()
    args = build_parser().parse_args(argv)
    try:
        with exit_on_termination():
            return args.func(args)
    except DmeaError as err:
        from dmea_dist.driver import report_error

        return report_error(err)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `dmea data show ... | head`: the reader closed the pipe; what it read is the answer
        from dmea_dist.stops import to_devnull

        with contextlib.suppress(AttributeError, OSError, ValueError):  # no flush of the rest at exit either
            to_devnull(sys.stdout)
        return 141  # 128 + SIGPIPE, what the shell reports for a command the pipe stopped
    finally:
        if argv is None:  # the `dmea` command, whose process exits next (not a caller passing its own argv)
            _skip_final_collection()
            if args.command in ("run", "resume"):  # Ray's shutdown follows: Ctrl-C pressed on would cut it short
                from dmea_dist.stops import hold_off_ctrl_c

                hold_off_ctrl_c()


def _skip_final_collection() -> None:
    """Keep every object the command made out of the interpreter's garbage collections at exit (`gc.freeze`):
    they would walk torch's, transformers' and Ray's objects once more, ~1.5 s after the quick start's last
    line on 2 cores (docs/BENCHMARKS.md). Exit still runs the atexit handlers (Ray's shutdown, logging) and
    flushes stdout and stderr; the command has closed its files, state and MLflow records already."""
    import gc

    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
