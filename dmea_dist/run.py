"""Resolve a `RunConfig` into the plain parts of one run: tasks, tokenizer, model.

`build_run(config, run_dir=...)` loads every task of the sequence (failing
early, before any training, on an unknown task, a malformed row or an empty
split), checks `model.max_length` against the model's positions, builds the
tokenizer, checks that the examples fit (`data/lengths.py`; before the tiny
backbone's pretraining), then the model, and only then creates the run
directory, so bad input leaves no half-made run behind.

Backbones:
* `model.pretrained`: a GPT-2 checkpoint (local folder or hub name) with its
  own tokenizer plus the reserved special tokens;
* otherwise a tiny GPT-2 with a byte-level BPE trained on the run's text,
  pretrained as a plain LM first (modeling/pretrain.py explains why) and
  cached under `output_dir/_cache/` by a hash of what it depends on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dmea_dist.config import RunConfig
from dmea_dist.data.formatting import Formatter, encode_task
from dmea_dist.data.lengths import check_lengths
from dmea_dist.data.registry import load_task, normalize_user_tasks
from dmea_dist.data.synthetic import FAMILIES, parse_synthetic_name
from dmea_dist.data.tokenizer import (
    SpecialTokenIds,
    load_pretrained_tokenizer,
    load_tokenizer,
    not_loadable,
    train_bpe_tokenizer,
)
from dmea_dist.data.user_tasks import locate_input
from dmea_dist.errors import ConfigError, DataError
from dmea_dist.files import make_dirs, sync_directory, sync_tree, write_text
from dmea_dist.method.policy import MethodPolicy, method_policy
from dmea_dist.offline import OFFLINE
from dmea_dist.typed_yaml import dump_yaml

if TYPE_CHECKING:  # torch and the model's modules (transformers' GPT-2, ~1.5 s) are imported where a model is
    # built, so the driver's input check (`preflight.check_input`), which needs only the tokenizer, starts faster
    from dmea_dist.modeling.model import DMEAModel

HELDOUT_INDEX = 1000  # synthetic tasks at this index and above pretrain tiny backbones


@dataclass
class Task:
    """One task of the sequence: its rows and encoded training/validation examples."""

    task_id: str
    index: int
    rows: dict[str, list[dict]]  # split -> rows
    train: tuple[list, list] = field(default_factory=lambda: ([], []))  # (qa, lm) examples
    val: tuple[list, list] = field(default_factory=lambda: ([], []))


@dataclass
class Run:
    config: RunConfig
    tasks: list[Task]
    tokenizer: Any
    model: DMEAModel
    formatter: Formatter
    policy: MethodPolicy
    run_dir: Path


def build_policy(config: RunConfig) -> MethodPolicy:
    m = config.method
    return method_policy(m.name, init=m.expansion.init, selection=m.selection.mode, top_k=m.selection.top_k,
                         replay=m.adaptation.replay, transfer=m.adaptation.transfer != "off",
                         scaling=m.adaptation.gradient_scaling,
                         transfer_min_yield=m.adaptation.min_yield if m.adaptation.transfer in ("gated", "usable")
                         else 0.0, transfer_next=m.adaptation.transfer == "usable")


def load_tasks(config: RunConfig) -> list[Task]:
    d = config.data
    caps = {}
    if d.max_train_samples:
        caps["train"] = d.max_train_samples
    if d.max_eval_samples:
        caps["validation"] = caps["test"] = d.max_eval_samples
    if len(d.tasks) > config.model.max_tasks:
        raise ConfigError(f"data.tasks has {len(d.tasks)} tasks but model.max_tasks={config.model.max_tasks} "
                          f"generation tokens are reserved; raise model.max_tasks")
    tasks = []
    for index, name in enumerate(d.tasks):
        data = load_task(name, data_root=d.root, user_tasks=d.user_tasks, synth_seed=d.synth_seed,
                         synth_sizes=d.synth_sizes, max_samples=caps or None)
        rows = {split: data[split].to_list() for split in ("train", "validation", "test")}
        for split, split_rows in rows.items():
            if not split_rows:
                raise DataError(f"task {name!r} has an empty {split} split; give it data or drop it from data.tasks")
        tasks.append(Task(task_id=name, index=index, rows=rows))
    return tasks


def _plain_text(rows: list[dict]) -> list[str]:
    return [f"{r['context']} {r['question']} {a}".replace("  ", " ") for r in rows for a in r["answer"]]


def pretraining_samples(config: RunConfig, tasks: list[Task]) -> list[tuple[str, str]]:
    """(input, output) pairs for the tiny backbone's LM pretraining, from outside the run's sequence.

    Held-out synthetic tasks (indices HELDOUT_INDEX and up) of the run's synthetic
    families, or of every data-to-text family when the run has none (e.g. RNNLG
    and E2E: English data-to-text text, as a web-trained GPT-2 has read). Never
    text of a task in the sequence, future tasks included.
    """
    pre = config.model.tiny.pretrain
    families = sorted({parse_synthetic_name(t.task_id)[0] for t in tasks if t.task_id.startswith("synth.")})
    families = families or [f for f in FAMILIES if f != "listops"]
    # (family, index), not the name as typed: synth.restaurant.01000 is synth.restaurant.1000, the same data
    used = {parse_synthetic_name(t) for t in config.data.tasks if t.startswith("synth.")}
    pairs = []
    for family in families:
        for k in range(pre.heldout_tasks):
            name = f"synth.{family}.{HELDOUT_INDEX + k}"
            if (family, HELDOUT_INDEX + k) in used:
                raise ConfigError(f"{name} is both in data.tasks and a held-out pretraining task; "
                                  f"use indices below {HELDOUT_INDEX} for sequence tasks")
            data = load_task(name, data_root=None, synth_seed=config.data.synth_seed,
                             synth_sizes=config.data.synth_sizes)
            pairs += [(_join_input(r), a) for r in data["train"].to_list() for a in r["answer"]]
    return pairs


def _join_input(row: dict) -> str:
    return f"{row['context']} {row['question']}".strip() if row["question"] else row["context"]


def pretraining_ids(tokenizer, pairs: list[tuple[str, str]], *, fmt: str) -> list[list[int]]:
    """Token ids of each pretraining pair: `input <|ans|> output` (fmt "samples") or `input output` ("plain").

    With "samples" the backbone learns the answer separator as an ordinary
    token of its language, the way a pretrained LM knows its punctuation: a
    frozen backbone whose separator row was never trained rarely emits it, and
    pseudo samples without it are unusable (issue 7: 94% malformed).
    """
    special = SpecialTokenIds.from_tokenizer(tokenizer)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    if fmt == "plain":
        return [encode(f"{x} {y}") for x, y in pairs]
    return [encode(x) + [special.ans] + encode(" " + y) for x, y in pairs]


# Pretraining's floating-point sums depend on torch's thread count, so the backbone is pretrained at a fixed
# one, whatever the process that fills the cache runs at (a driver at its cores' count, a `dmea run
# --in-process` under OMP_NUM_THREADS=1, a coordinator actor at 1). Before, a run's result depended on which
# process had filled the cache: quick start seed 0 in process at one thread ended at 68.34 / -1.75 from a
# cache made at one thread and at 65.21 / -2.01 from one made at two (same code, 2026-12-04). Two, not one:
# the quick start's pretraining takes 45 s at two threads and 72 s at one on a 2-core machine.
PRETRAIN_THREADS = 2


@contextmanager
def no_transformers_bars() -> Iterator[None]:
    """No transformers progress bar inside the block: a bar for loading or writing one small model's file is
    noise in a command's output (`dmea model summary`, `dmea run --in-process --quiet`)."""
    from transformers.utils import logging as transformers_logging

    shown = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            transformers_logging.enable_progress_bar()


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_backbone(config: RunConfig, tasks: list[Task], *, cache_root: Path,
                  check_tokenizer: Callable[[Any], None] | None = None, load_model: bool = True,
                  say: Callable[[str], None] | None = None):
    """(tokenizer, pretrained GPT2LMHeadModel) for the tiny default, cached on disk.

    The BPE covers the pretraining text and the run's text, as GPT-2's BPE
    covers English (a BPE of the synthetic text alone splits E2E and laptop
    samples into 110-130 tokens, past the context). The backbone's weights
    learn from the pretraining text only. Rows of tokens it never saw are
    drawn from the trained rows' statistics, like tokens added to a
    downloaded checkpoint: the generation tokens, the separator when
    pretraining did not use it, and words only the run's text uses (else a
    frozen tied head could hardly ever emit them). Byte tokens no text uses
    keep their tiny initial rows: drawn like the others, a sampler emits them
    (seen: garbage bytes in 20% of E2E pseudo samples).

    `check_tokenizer(tokenizer)` runs as soon as the tokenizer exists, before
    pretraining: inputs too long for the model fail in seconds, not minutes.
    `load_model=False`: (tokenizer, None) when the backbone is cached (a check
    that needs only the tokenizer); a backbone not yet cached is still made.
    `say(line)`: told when pretraining starts and ends (a first run's user waits for it).
    """
    tiny, pre = config.model.tiny, config.model.tiny.pretrain
    run_text = [text for t in tasks for text in _plain_text(t.rows["train"])]
    # the text the BPE is trained on, not only the task names: a user task's file, or its split, may change
    text_hash = hashlib.sha256("\n".join(run_text).encode("utf-8")).hexdigest()
    key_src = {"tiny": dataclasses.asdict(tiny), "tasks": config.data.tasks, "seed": config.train.seed,
               "synth": [config.data.synth_seed, config.data.synth_sizes, config.data.max_train_samples],
               "text": text_hash, "max_tasks": config.model.max_tasks,
               "version": 7}  # 6: fused tanh-GELU; 7: untrained tokens recorded
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    cache = cache_root / f"backbone-{key}"
    check = check_tokenizer or (lambda tokenizer: None)
    if (cache / "model.safetensors").is_file():
        tokenizer = load_tokenizer(cache)
        check(tokenizer)
        if not load_model:
            return tokenizer, None
        from transformers import GPT2LMHeadModel

        with no_transformers_bars():
            return tokenizer, GPT2LMHeadModel.from_pretrained(cache)
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from dmea_dist.modeling.pretrain import pretrain_lm, reserve_rows

    pairs = pretraining_samples(config, tasks) if pre.corpus != "none" else []
    tokenizer = tiny_tokenizer(config, tasks, pairs)
    check(tokenizer)
    # GPT-2's activation, the tanh approximation of GELU, as torch's one fused kernel: "gelu_new" computes it
    # in six elementwise ops, a quarter of a tiny model's step on a CPU (pretraining 48 -> 39 ms a step)
    gpt2 = GPT2Config(vocab_size=len(tokenizer), n_positions=tiny.n_positions, n_embd=tiny.n_embd,
                      n_layer=tiny.n_layer, n_head=tiny.n_head, bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, activation_function="gelu_pytorch_tanh")
    torch.manual_seed(config.train.seed)
    backbone = GPT2LMHeadModel(gpt2)
    started = time.perf_counter()
    if say is not None and pairs:
        say(f"pretraining the tiny backbone ({pre.steps} steps, first run only; cached in {cache})")
    with torch_threads(PRETRAIN_THREADS):  # the weights, not only the steps: reserve_rows reduces too
        if pairs:
            ids = pretraining_ids(tokenizer, pairs, fmt=pre.format)
            losses = pretrain_lm(backbone, ids, steps=pre.steps, lr=pre.lr, batch_size=pre.batch_size,
                                 seq_len=min(pre.seq_len, tiny.n_positions), eos_id=tokenizer.eos_token_id,
                                 seed=config.train.seed, dropout=pre.dropout)
            if not all(math.isfinite(x) for x in losses):
                raise ConfigError(f"tiny backbone pretraining diverged (loss {losses[-1]}) at "
                                  f"model.tiny.pretrain.lr={pre.lr}; lower model.tiny.pretrain.lr")
            backbone.config.dmea_pretrain_loss = [losses[0], losses[-1]]
            seen = {i for seq in ids for i in seq}
            run_only = {i for seq in tokenizer(run_text, add_special_tokens=False)["input_ids"] for i in seq} - seen
            special = SpecialTokenIds.from_tokenizer(tokenizer)
            reserve = run_only | set(special.tasks) | ({special.ans} - seen)
            reserve_rows(backbone, sorted(reserve), seed=config.train.seed)
            backbone.config.dmea_untrained_tokens = sorted(reserve)  # the rows model.token_rows may train
    with no_transformers_bars():
        _publish(cache, lambda folder: (tokenizer.save_pretrained(folder), backbone.save_pretrained(folder)))
    if say is not None and pairs:
        first, last = backbone.config.dmea_pretrain_loss
        say(f"backbone pretrained in {time.perf_counter() - started:.0f} s (LM loss {first:.2f} -> {last:.2f})")
    return tokenizer, backbone


def tiny_tokenizer(config: RunConfig, tasks: list[Task], pairs: list[tuple[str, str]] | None = None):
    """The BPE `tiny_backbone` trains (without pretraining anything): on the run's training text and the
    pretraining pairs (`pretraining_samples` unless given). `dmea data show --config` measures lengths with it."""
    tiny = config.model.tiny
    if pairs is None:
        pairs = pretraining_samples(config, tasks) if tiny.pretrain.corpus != "none" else []
    run_text = [text for t in tasks for text in _plain_text(t.rows["train"])]
    return train_bpe_tokenizer(run_text + [f"{x} {y}" for x, y in pairs], vocab_size=tiny.vocab_size,
                               max_tasks=config.model.max_tasks)


def _publish(folder: Path, write: Callable[[Path], Any]) -> None:
    """Write a cache folder whole or not at all: `write` fills a private folder beside it, which is then
    renamed into place. A run killed mid-write leaves no half cache, and of two runs that fill the same
    cache at once (same key, same content) the first rename wins and the other's copy is dropped.

    Durable like a run's files (`dmea_dist.files`): the folder's files are fsynced before the rename and the
    parent after it, else a machine crash could leave a cache whose weights are empty under the real name,
    which every later run would load. The folder is made by a plain mkdir, so it has what one gives: the umask's
    mode (mkdtemp's is 0700), and a shared folder's setgid bit and default ACLs, which a chmod would reset."""
    make_dirs(folder.parent)
    private = folder.parent / f".{folder.name}.{os.getpid()}.{secrets.token_hex(4)}"
    private.mkdir()  # FileExistsError rather than a folder another writer fills
    try:
        write(private)
        sync_tree(private)
        try:
            os.replace(private, folder)  # a folder onto a non-empty one: refused (ENOTEMPTY), never merged
        except OSError:
            if not (folder / "model.safetensors").is_file():
                raise
        else:
            sync_directory(folder.parent)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def model_positions(config: RunConfig) -> int:
    """Positions of the backbone, without building it: the tiny config's, or the checkpoint's config.json."""
    if not config.model.pretrained:
        return config.model.tiny.n_positions
    from transformers import AutoConfig

    try:
        checkpoint = AutoConfig.from_pretrained(config.model.pretrained, **OFFLINE)
    except (OSError, ValueError) as err:  # the first read of model.pretrained in a run: a clear error, not transformers'
        raise ConfigError(not_loadable("model.pretrained", config.model.pretrained, "model config (config.json)", err)) from None
    return int(getattr(checkpoint, "n_positions", None) or checkpoint.max_position_embeddings)


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_checkpoint(config: RunConfig, tokenizer) -> None:
    """model.pretrained's weights are there (a local folder) and its tokenizer fits its embeddings, before any
    work: on Ray, build_run's transformers error would come back as the coordinator actor's traceback."""
    from transformers import AutoConfig

    name = config.model.pretrained
    folder = Path(os.path.expanduser(name))
    if folder.is_dir() and not any((folder / f).is_file() for f in WEIGHT_FILES):
        raise ConfigError(f"model.pretrained={name!r}: the folder has no weights (none of {', '.join(WEIGHT_FILES)}); "
                          f"give the folder model.save_pretrained(folder) wrote")
    rows = getattr(AutoConfig.from_pretrained(name, **OFFLINE), "vocab_size", None)  # read by check_max_length already
    if rows is not None and len(tokenizer) < rows:
        raise ConfigError(f"model.pretrained={name!r}: its tokenizer has {len(tokenizer)} tokens with the "
                          f"{config.model.max_tasks + 1} reserved ones, fewer than the checkpoint's {rows} embedding "
                          f"rows (config.json vocab_size): the tokenizer is not the one the checkpoint was trained "
                          f"with (a vocabulary padded beyond its tokenizer is not supported)")


def check_max_length(config: RunConfig) -> int:
    """model.max_length must fit the model's positions; returns the positions. Runs before any pretraining."""
    positions, m = model_positions(config), config.model
    if m.max_length > positions:
        owner = "" if m.pretrained else " (model.tiny.n_positions)"
        raise ConfigError(f"model.max_length={m.max_length} is longer than the model's {positions} positions"
                          f"{owner}; set model.max_length <= {positions}")
    return positions


def length_check(config: RunConfig, tasks: list[Task], *, positions: int) -> Callable[[Any], None]:
    """check_lengths of every task with a tokenizer, for tiny_backbone or a pretrained tokenizer."""
    rows = [(t.task_id, t.rows) for t in tasks]
    specs = normalize_user_tasks(config.data.user_tasks)

    def locate(task_id: str, split: str, row: dict) -> str | None:  # a user task's row: its file and line
        spec = specs.get(task_id)
        return locate_input(spec, split, context=row["context"], question=row["question"]) if spec else None

    return lambda tokenizer: check_lengths(Formatter(tokenizer, max_length=config.model.max_length), rows,
                                           train_references=config.data.train_references,
                                           overlength=config.data.overlength, positions=positions, locate=locate)


def build_run(config: RunConfig, *, run_dir: str | Path) -> Run:
    """Resolve the config into tasks, tokenizer, model and formatter (no DMEA training yet)."""
    from dmea_dist.modeling.model import DMEAModel

    tasks = load_tasks(config)
    m = config.model
    check = length_check(config, tasks, positions=check_max_length(config))
    if m.pretrained:
        tokenizer = load_pretrained_tokenizer(m.pretrained, max_tasks=m.max_tasks)
        check_checkpoint(config, tokenizer)
        check(tokenizer)
        model = DMEAModel.from_pretrained(m.pretrained, vocab_size=len(tokenizer), bottleneck=m.bottleneck)
    else:
        tokenizer, backbone = tiny_backbone(config, tasks, cache_root=Path(config.output_dir) / "_cache",
                                            check_tokenizer=check)
    run_dir = Path(run_dir)  # created only now: every check above has passed
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_yaml(config.to_dict()))  # atomic, as every record of the run
    if not m.pretrained:
        # the run keeps its own backbone and tokenizer, so any task can be served from it later
        with no_transformers_bars():
            backbone.save_pretrained(run_dir / "backbone")
        tokenizer.save_pretrained(run_dir / "tokenizer")
        sync_tree(run_dir / "backbone")  # a resume rebuilds the model from them: on disk before any state
        sync_tree(run_dir / "tokenizer")
        model = DMEAModel(backbone, bottleneck=m.bottleneck)
    return assemble_run(config, tasks, tokenizer, model, run_dir)


def reopen_run(config: RunConfig, run_dir: str | Path, *, backbone: str | None = None,
               modules: str | None = None) -> Run:
    """The parts of a run on disk (for `dmea resume`): its tokenizer, its backbone (or the fine-tuned
    snapshot `backbone`) and module pools `modules` (paths relative to `run_dir`). No pretraining."""
    from transformers import GPT2LMHeadModel

    from dmea_dist.modeling.io import load_modules
    from dmea_dist.modeling.model import DMEAModel

    m, run_dir = config.model, Path(run_dir)
    tasks = load_tasks(config)
    if m.pretrained:
        tokenizer = load_pretrained_tokenizer(m.pretrained, max_tasks=m.max_tasks)
        source = run_dir / backbone if backbone else m.pretrained
        model = DMEAModel.from_pretrained(str(source), vocab_size=len(tokenizer), bottleneck=m.bottleneck)
    else:
        tokenizer = load_tokenizer(run_dir / "tokenizer")
        with no_transformers_bars():
            model = DMEAModel(GPT2LMHeadModel.from_pretrained(run_dir / (backbone or "backbone")),
                              bottleneck=m.bottleneck)
    if modules:
        load_modules(model, run_dir / modules)
    return assemble_run(config, tasks, tokenizer, model, run_dir)


def assemble_run(config: RunConfig, tasks: list[Task], tokenizer, model: DMEAModel, run_dir: Path) -> Run:
    """The run's parts, its tasks' training and validation examples encoded."""
    import torch

    if config.model.dropout is not None:  # in the modules and in the config replicas are built from
        for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            setattr(model.backbone.config, key, config.model.dropout)
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = config.model.dropout
    formatter = Formatter(tokenizer, max_length=config.model.max_length)
    for task in tasks:
        task.train = encode_task(formatter, task.rows["train"], task_index=task.index,
                                 references=config.data.train_references)
        task.val = encode_task(formatter, task.rows["validation"], task_index=task.index)
    torch.manual_seed(config.train.seed)
    return Run(config=config, tasks=tasks, tokenizer=tokenizer, model=model, formatter=formatter,
               policy=build_policy(config), run_dir=run_dir)
