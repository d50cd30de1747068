"""The `dmea` command.

    dmea run CONFIG [--set key=value ...]   run a whole task sequence
    dmea data list                          the tasks the registry knows
    dmea data show TASK                     split sizes, formatted examples, token lengths
    dmea model summary CONFIG               the backbone, its modules and parameter counts
    dmea generate RUN_DIR TASK CONTEXT...   answer inputs with any recorded task of a run

Errors caused by input (config, data) print one clear line and exit 2; no
traceback.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Sequence

from dmea_dist.errors import DmeaError

DEFAULT_DATA_ROOT = "../shared/data"


def _data_root(args) -> str:
    return args.data_root or os.environ.get("DMEA_DATA_ROOT") or DEFAULT_DATA_ROOT


def _user_tasks(args) -> dict:
    if not getattr(args, "config", None):
        return {}
    from dmea_dist.config import load_config

    return load_config(args.config).data.user_tasks


def cmd_data_list(args) -> int:
    from dmea_dist.data.registry import list_tasks

    infos = list_tasks(data_root=_data_root(args), user_tasks=_user_tasks(args))
    width = max(len(i.name) for i in infos)
    for info in infos:
        flag = "" if info.available else "  (files not found)"
        print(f"{info.name:<{width}}  {info.kind:<9}  {info.description}{flag}")
    return 0


def cmd_data_show(args) -> int:
    from dmea_dist.data.formatting import Formatter
    from dmea_dist.data.registry import load_task
    from dmea_dist.data.tokenizer import load_pretrained_tokenizer, train_bpe_tokenizer

    data = load_task(args.task, data_root=_data_root(args), user_tasks=_user_tasks(args), synth_seed=args.seed)
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
    model.add_module()
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
    from dmea_dist.driver import run_sequence

    config = load_config(args.config, args.set)
    if args.in_process:
        run_sequence(config, run_dir=args.run_dir, progress=not args.quiet)
        return 0
    from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory

    where = connect(args.address or config.ray.address, num_cpus=config.ray.num_cpus)
    print(f"ray: {'embedded local cluster' if where == 'local' else where}", file=sys.stderr)
    run_sequence(config, run_dir=args.run_dir, progress=not args.quiet, coordinator_factory=ray_coordinator_factory)
    return 0


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
            p.add_argument("--max-length", type=int, default=128)
            p.add_argument("--seed", type=int, default=0, help="seed of synthetic tasks")
        p.add_argument("--data-root", help=f"real corpora folder (default $DMEA_DATA_ROOT or {DEFAULT_DATA_ROOT})")
        p.add_argument("--config", help="a run config whose data.user_tasks to include")
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
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
