"""Typed, validated run configuration.

A run is described by one YAML file (see configs/) plus optional dotted
overrides from the command line (`--set train.lr=1e-4`). The YAML is loaded
into frozen dataclasses (`dmea_dist.typed_yaml`: YAML 1.2's numbers, strict
keys); every value is checked where it is defined:

* an unknown key fails with the file, the dotted key and the closest valid key;
* a wrong type fails with the expected type;
* an out-of-range value fails with the accepted range or choices.

Each dataclass documents its fields and the reasons for their defaults.
Functions elsewhere take plain keyword arguments, so only the entry points
read this module. The DeepSpeed section is passed through as
DeepSpeed defines it (a plain dict), merged over our CPU-safe defaults; its keys
are checked against the ones DeepSpeed reads (DEEPSPEED_KEYS), as DeepSpeed ignores others,
and a number written in quotes there is refused by its dotted key (a quoted number
there is a mistake, never a DeepSpeed string setting: DeepSpeed would fail on it
only at the first adaptation).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dmea_dist import typed_yaml
from dmea_dist.errors import ConfigError
from dmea_dist.method.policy import method_policy

METHODS = ("dmea", "acm", "lamol", "finetune", "adapter", "multitask")

# a string that is only a number (decimal or exponent form): in `deepspeed:` it was meant as one
_NUMBER_TEXT = re.compile(r"^\s*[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?\s*$")


@dataclass(frozen=True)
class PretrainConfig:
    """Plain-LM pretraining of the tiny backbone before it is frozen (see modeling/pretrain.py)."""

    # heldout_synth: synthetic tasks at indices no sequence uses (the run's families, or every
    # data-to-text family when the run has none); never text of the run's own tasks
    corpus: Literal["heldout_synth", "none"] = "heldout_synth"
    # samples: `context <|ans|> answer <eos>` (the backbone learns the separator, as a pretrained
    # LM knows its own punctuation); plain: `context answer <eos>`
    format: Literal["samples", "plain"] = "samples"
    # enough for the tiny backbone to learn to copy names and values from its input (measured on the quick
    # start: answers realising their input, backbone alone, 0% after 300 steps at 3e-3, 71-88% after 800 at 1e-2)
    steps: int = 800
    lr: float = 1e-2
    batch_size: int = 32
    seq_len: int = 64
    dropout: float = 0.0  # during pretraining only (see modeling/pretrain.py)
    heldout_tasks: int = 4  # held-out synthetic tasks per family

    def __post_init__(self):
        _check_range("model.tiny.pretrain.steps", self.steps, 1, 10**7)
        _check_range("model.tiny.pretrain.lr", self.lr, 1e-8, 1.0)
        _check_range("model.tiny.pretrain.batch_size", self.batch_size, 1, 65536)
        _check_range("model.tiny.pretrain.dropout", self.dropout, 0.0, 0.9)
        _check_range("model.tiny.pretrain.seq_len", self.seq_len, 8, 8192)
        _check_range("model.tiny.pretrain.heldout_tasks", self.heldout_tasks, 1, 1000)


@dataclass(frozen=True)
class TinyModelConfig:
    """A GPT-2 built from scratch (offline default; tokenizer trained on the run's data)."""

    n_layer: int = 4
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int = 2000  # size of the byte-level BPE trained on the run's data
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    def __post_init__(self):
        _check_range("model.tiny.n_layer", self.n_layer, 1, 96)
        _check_range("model.tiny.n_embd", self.n_embd, 8, 8192)
        _check_range("model.tiny.n_head", self.n_head, 1, 1024)
        _check_range("model.tiny.n_positions", self.n_positions, 16, 8192)
        _check_range("model.tiny.vocab_size", self.vocab_size, 300, 200_000)
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.tiny.n_embd={self.n_embd} must be divisible by model.tiny.n_head={self.n_head}"
            )


@dataclass(frozen=True)
class ModelConfig:
    """The backbone: a pretrained checkpoint (local dir or hub name) or a tiny fresh GPT-2."""

    pretrained: str | None = None  # e.g. "gpt2", "gpt2-medium", or a local directory
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    bottleneck: int | None = None  # adapter width; None = d_model // 16
    max_tasks: int = 128  # generation tokens reserved up front (no embedding resize mid-run)
    max_length: int = 128  # tokens per training example (at most the model's positions); see data.overlength
    # dropout of the frozen backbone while modules train (None: the backbone's own, GPT-2's 0.1). With dropout each
    # data-parallel rank draws its own masks, so only dropout 0 trains bit-for-bit alike on 1, 2 or 4 workers.
    dropout: float | None = None
    # Embedding rows of tokens the backbone never trained (words only the run's text uses, added special tokens):
    # "frozen" keeps them as drawn (like the rest of the backbone); "trained": the first task whose training data
    # uses a token trains its row with its modules, frozen after (DMEAModel.claim_token_rows); "words": the same for
    # the text's own tokens only, not the added special tokens (separator, end, generation tokens). Module methods
    # only: lamol/finetune train the whole backbone anyway, so "trained"/"words" with them is refused (RunConfig).
    # "auto" (the default): "words" for the module methods, nothing for lamol/finetune. Why (docs/RESULTS-history.md
    # section 2b, one machine): on RNNLG+E2E, where the tiny backbone lacks hundreds of the tasks' words, training
    # their rows lifts DMEA's final average in every run; on the quick start, where it lacks only the generation
    # tokens, training those cost DMEA 1.5 BWT on the mean of five seeds, the words' rows nothing measurable. On a
    # downloaded GPT-2 every word is trained, so "words" leaves the backbone as "frozen" does.
    token_rows: Literal["auto", "frozen", "trained", "words"] = "auto"

    def __post_init__(self):
        if self.pretrained and self.pretrained.startswith("~"):  # a folder under home (a hub name never starts so)
            object.__setattr__(self, "pretrained", os.path.expanduser(self.pretrained))
        if self.dropout is not None:
            _check_range("model.dropout", self.dropout, 0.0, 0.9)
        if self.bottleneck is not None:
            _check_range("model.bottleneck", self.bottleneck, 1, 65536)
        _check_range("model.max_tasks", self.max_tasks, 1, 100_000)
        _check_range("model.max_length", self.max_length, 16, 8192)


@dataclass(frozen=True)
class DataConfig:
    """Which tasks, in which order, and where their data lives."""

    tasks: list[str] = field(default_factory=list)
    root: str = "../shared/data"  # real corpora (RNNLG, E2E); relative to the working directory
    user_tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> UserTaskSpec fields
    synth_seed: int = 0
    synth_sizes: list[int] = field(default_factory=lambda: [400, 50, 50])  # train, validation, test
    max_train_samples: int | None = None  # cap per task, for quick runs
    max_eval_samples: int | None = None  # cap on validation/test rows per task
    train_references: Literal["first", "all"] = "first"  # which references become training examples
    # examples longer than model.max_length: "error" refuses the run before any training (naming the task,
    # split and row); "truncate" cuts the input from its end (the answer kept) and warns once per task with
    # the count, and how many distinct inputs became one prompt (the model can no longer tell them apart)
    overlength: Literal["error", "truncate"] = "error"

    def __post_init__(self):
        if not self.tasks:
            raise ConfigError("data.tasks is empty: list the task names to learn, e.g. [synth.travel.00, e2e]")
        # synth.travel.3 and synth.travel.03 are one generated task (the index is a number)
        keys = [re.sub(r"^(synth\.[^.]+)\.0*(\d)", r"\1.\2", t) for t in self.tasks]
        if len(set(keys)) != len(keys):
            dup = sorted({t for t, k in zip(self.tasks, keys, strict=True) if keys.count(k) > 1})
            raise ConfigError(f"data.tasks lists {dup} more than once (as typed, or one generated task under two "
                              f"spellings of its index); each task appears once in a sequence")
        if len(self.synth_sizes) != 3 or min(self.synth_sizes) < 1:
            raise ConfigError(f"data.synth_sizes={self.synth_sizes} must be three positive ints [train, validation, test]")
        for key in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None:
                _check_range(f"data.{key}", value, 1, 10**9)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation shared by every stage (reference values for GPT-2 small)."""

    lr: float = 1.75e-4  # adapters and expansion coefficients (ACM)
    full_finetune_lr: float = 6.25e-5  # lamol / finetune train the whole backbone (LAMOL's rate)
    adam_eps: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global gradient norm, in the search and in adaptation; 0: no clipping
    batch_size: int = 4  # global batch of each task sub-batch: data-parallel ranks each take a share
    lm_lambda: float = 0.25  # weight of the LM loss that teaches the model to generate pseudo samples
    # loss weight of the answer separator as a target (LAMOL/ACM `tokens_weight`: 5); a weighted mean,
    # so the separator counts this many tokens in both the sum and the normaliser
    separator_weight: float = 5.0
    first_task_epochs: float = 9.0
    seed: int = 0
    autocast: Literal["none", "bf16"] = "none"  # bf16 matmuls in adaptation; weights/grads/optimizer stay fp32
    # > 0: adaptation cuts every global batch into this many fixed pieces and reduces them in a fixed order, so
    # 1, 2 or 4 training ranks (dividing it) train bit for bit alike, dropout included (dmea_dist/engine.py);
    # costs more, smaller forwards. 0: each rank's share in one forward, results differ by rounding across ranks
    virtual_shards: int = 0

    def __post_init__(self):
        _check_range("train.lr", self.lr, 1e-8, 1.0)
        _check_range("train.full_finetune_lr", self.full_finetune_lr, 1e-8, 1.0)
        _check_range("train.separator_weight", self.separator_weight, 0.0, 1000.0)
        _check_range("train.batch_size", self.batch_size, 1, 4096)
        _check_range("train.lm_lambda", self.lm_lambda, 0.0, 10.0)
        _check_range("train.first_task_epochs", self.first_task_epochs, 0.01, 1000.0)
        _check_range("train.grad_clip", self.grad_clip, 0.0, 1e6)
        _check_range("train.adam_eps", self.adam_eps, 0.0, 1.0)
        _check_range("train.weight_decay", self.weight_decay, 0.0, 10.0)
        _check_range("train.virtual_shards", self.virtual_shards, 0, self.batch_size)
        # torch.manual_seed takes 64 bits, and the run adds a task's index to it: a larger seed failed building
        # the run, as a traceback ("Overflow when unpacking long long")
        _check_range("train.seed", self.seed, -(2**62), 2**62)


@dataclass(frozen=True)
class ExpansionConfig:
    """Stage 1: architecture search over {old modules, one new module} per layer."""

    epochs: float = 6.0
    warmup_epochs: float = 3.0  # coefficients frozen for this part, then trained jointly (ACM)
    # similarity init: old module beta * s, new module -beta * best s. The default beta = mix_ini starts a task
    # identical to an earlier one (s = 1) where ACM's static init starts (ACM presumes relatedness), and a less
    # similar task nearer the new module. (2 * mix_ini made DMEA reuse more than ACM on RNNLG in the runs behind 297ccc4, which no docs table records.)
    beta: float = 0.15
    init: Literal["similarity", "static"] = "similarity"  # static: ACM's +mix_ini old / -mix_ini new
    mix_ini: float = 0.15  # ACM's static initial logit (old +mix_ini, new -mix_ini)
    entropy_weight: float = 0.01
    # None: the adapters' learning rate, in the same AdamW (ACM). The coefficients must move on the
    # adapters' scale: a rate large enough to forget the initialisation makes every init the same.
    coefficient_lr: float | None = None
    # overrides: beta, entropy_weight, seed (default: the candidate's position; mixed with train.seed and the
    # task, so every task's and candidate's new modules start from their own draw)
    candidates: list[dict[str, Any]] = field(default_factory=lambda: [{}])

    def __post_init__(self):
        _check_range("method.expansion.epochs", self.epochs, 0.01, 1000.0)
        _check_range("method.expansion.warmup_epochs", self.warmup_epochs, 0.0, self.epochs)
        _check_range("method.expansion.entropy_weight", self.entropy_weight, 0.0, 100.0)
        _check_range("method.expansion.beta", self.beta, 0.0, 1000.0)
        _check_range("method.expansion.mix_ini", self.mix_ini, 0.0, 1000.0)
        if self.coefficient_lr is not None:
            _check_range("method.expansion.coefficient_lr", self.coefficient_lr, 1e-8, 10.0)
        if not self.candidates:
            raise ConfigError("method.expansion.candidates is empty: give at least one candidate ({} = defaults)")
        allowed = {"beta", "entropy_weight", "seed"}
        for i, cand in enumerate(self.candidates):
            unknown = set(cand) - allowed
            if unknown:
                raise ConfigError(
                    f"method.expansion.candidates[{i}] has unknown keys {sorted(unknown)}; accepted: {sorted(allowed)}"
                )
            # read only by the search, from the second task on: checked here as the section's own values are
            for name, high in (("beta", 1000.0), ("entropy_weight", 100.0)):
                if name in cand:
                    value, key = cand[name], f"method.expansion.candidates[{i}].{name}"
                    if isinstance(value, bool) or not isinstance(value, int | float):
                        raise ConfigError(f"{key}={value!r} must be a number")
                    _check_range(key, float(value), 0.0, high)
            seed = cand.get("seed", 0)
            if isinstance(seed, bool) or not (isinstance(seed, int) or isinstance(seed, float) and seed.is_integer()):
                raise ConfigError(f"method.expansion.candidates[{i}].seed={seed!r} must be an int")


@dataclass(frozen=True)
class SelectionConfig:
    """Stage 2: pick the most similar earlier tasks by input-subspace similarity."""

    mode: Literal["subspace", "random", "none"] = "subspace"
    top_k: int = 2
    epsilon: float = 0.97  # energy kept by each task's per-layer basis
    n_samples: int = 100  # samples whose representations define a task's subspace
    site: Literal["block_input"] = "block_input"  # where representations are read
    # the path the new task's inputs take when compared with an earlier task's basis: "earlier", that task's
    # own path with the token rows of the tasks up to it (the network its basis was read from), or "own", the
    # new task's path after expansion with every row, whose new modules have had only the search's training
    # (docs/RESULTS.md, "Selection along the earlier path")
    route: Literal["earlier", "own"] = "earlier"

    def __post_init__(self):
        _check_range("method.selection.top_k", self.top_k, 0, 1000)
        _check_range("method.selection.epsilon", self.epsilon, 0.01, 1.0)
        _check_range("method.selection.n_samples", self.n_samples, 1, 100_000)


@dataclass(frozen=True)
class AdaptationConfig:
    """Stage 3: train the new task with transfer and replay, balanced by gradient scaling."""

    epochs: float = 9.0
    gamma: float = 0.2  # pseudo samples = gamma * new task's training size, per use (see pseudo_budget, pseudo_split)
    pseudo_budget: Literal["total", "per_task"] = "total"  # total: split over the old tasks (LAMOL/ACM)
    # which tasks share a "total" budget: by_use, gamma * N for replay split over the replayed tasks (ACM's split)
    # and gamma * N for transfer over the selected tasks, a task in both drawn once at the larger count and used
    # whole by both; all, one gamma * N over every task drawn (before 2026-12-08: a selected task took its share
    # from the replayed ones, even when the transfer gate then dropped it; docs/RESULTS.md section 0g)
    pseudo_split: Literal["by_use", "all"] = "by_use"
    # alternate: each step = one new-task batch + one batch of one replayed task, round-robin, reshuffled
    # every round (ACM's order), + one of one transfer stream by a second rotation where there are any
    # (method/adaptation.py); all: one batch of every stream in every step
    mixing: Literal["alternate", "all"] = "alternate"
    # warn when fewer than this share of generated pseudo samples are well formed (and, with transfer
    # "gated", do not transfer from that task)
    min_yield: float = 0.9
    gradient_scaling: bool = True
    eta_clamp: list[float] = field(default_factory=lambda: [0.1, 10.0])
    progress: Literal["epochs", "fraction"] = "epochs"  # meaning of t in exp(-t)
    # selected tasks' pseudo samples through the new path: gated (only from a task whose pseudo samples reach
    # min_yield in this task's generation; docs/RESULTS-history.md section 2 for why), usable (gated, and a selected
    # task that fails the gate gives its place to the next task in selection's order, whose samples are then
    # drawn, until top_k pass or none is left), new_path (always), off
    transfer: Literal["gated", "usable", "new_path", "off"] = "gated"
    replay: Literal["shared", "all", "none"] = "shared"  # which earlier tasks replay through their own paths
    top_k_sampling: int = 20  # generation of pseudo samples
    # a pseudo sample's answer: greedy after the separator (its input is sampled; the answer is the model's
    # best answer to it, as when evaluated), or sampled like its input (LAMOL/ACM)
    pseudo_answer: Literal["greedy", "sampled"] = "greedy"
    # the separator of a pseudo sample: "free" (the model's own draws; a sample without exactly one separator
    # is dropped as malformed) or "one" (until the separator the end token's probability goes to it, after it
    # a second separator's goes to the end token, and both are barred where the input or the answer would be
    # empty: `generation.OneSeparator`). With "one" the yield no longer counts samples that lost the format, so
    # it says less about their content, and more tasks pass the transfer gate (min_yield). docs/RESULTS-history.md 2f
    pseudo_separator: Literal["free", "one"] = "free"

    def __post_init__(self):
        _check_range("method.adaptation.epochs", self.epochs, 0.01, 1000.0)
        _check_range("method.adaptation.gamma", self.gamma, 0.0, 100.0)
        _check_range("method.adaptation.min_yield", self.min_yield, 0.0, 1.0)
        _check_range("method.adaptation.top_k_sampling", self.top_k_sampling, 1, 10**6)
        if len(self.eta_clamp) != 2 or not 0 < self.eta_clamp[0] <= self.eta_clamp[1]:
            raise ConfigError(f"method.adaptation.eta_clamp={self.eta_clamp} must be [low, high] with 0 < low <= high")


@dataclass(frozen=True)
class MethodConfig:
    name: Literal["dmea", "acm", "lamol", "finetune", "adapter", "multitask"] = "dmea"
    expansion: ExpansionConfig = field(default_factory=ExpansionConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    adaptation: AdaptationConfig = field(default_factory=AdaptationConfig)

    def __post_init__(self):
        if self.name == "dmea" and self.adaptation.replay == "all":
            raise ConfigError(
                "method.adaptation.replay='all' with method.name=dmea: only the new path trains, so an earlier "
                "task that shares no module with it has nothing to replay into (its loss trains no parameter); "
                "use 'shared' (every earlier task the new task can change) or 'none'. Replay of every earlier "
                "task through the whole model is method.name=lamol")


@dataclass(frozen=True)
class EvalConfig:
    decoding: Literal["greedy", "top_k"] = "greedy"
    top_k: int = 20
    max_new_tokens: int = 64
    max_samples: int | None = None  # cap on test rows per task, for quick runs
    all_tasks: bool = False  # also evaluate tasks not yet seen (forward transfer)
    metric: Literal["rouge", "bleu", "em"] = "rouge"
    batch_size: int = 32
    # score every seen task after every `every`-th task and after the last (long sequences); after the others only
    # the task just trained (R's diagonal: BWT and forgetting) and, with all_tasks, the next (FWT); the rest of
    # those rows stays empty in R
    every: int = 1

    def __post_init__(self):
        _check_range("eval.every", self.every, 1, 10**6)
        _check_range("eval.max_new_tokens", self.max_new_tokens, 1, 4096)
        _check_range("eval.top_k", self.top_k, 1, 10**6)
        _check_range("eval.batch_size", self.batch_size, 1, 65536)
        if self.max_samples is not None:
            _check_range("eval.max_samples", self.max_samples, 1, 10**9)


@dataclass(frozen=True)
class TrackingConfig:
    uri: str = "sqlite:///mlflow.db"  # any MLflow tracking URI; a server for multi-node runs
    experiment: str = "dmea-dist"
    enabled: bool = True


@dataclass(frozen=True)
class RayConfig:
    """Where the stages run: `dmea run` starts an embedded local Ray unless `address` joins a cluster."""

    address: str | None = None  # None: embedded local Ray (or $RAY_ADDRESS); "auto", "host:6379", ray://...
    # cores of the embedded local Ray (None: all); the roles are sized for them and take turns on them, so Ray
    # declares at least what they reserve together (cluster.logical_cpus)
    num_cpus: int | None = None
    # expansion candidates in flight at once; None: set by where the run is (`sized`), one per core on an
    # embedded local Ray (the pool's size does not change results), 1 on a cluster
    num_search_workers: int | None = None
    search_cpus: float = 1.0
    num_generation_actors: int = 1  # model replicas sharing pseudo-sample generation and evaluation
    # CPUs (= torch threads) per generation actor and per training rank: a thread count changes floating-point
    # results (sampled pseudo samples amplify that), so it is not taken from the machine
    generation_cpus: float = 1.0
    num_train_workers: int = 1  # Ray Train data-parallel ranks of the DeepSpeed adaptation
    train_cpus: float = 1.0
    use_gpu: bool = False  # one GPU per training worker (bf16/fp16 unsupported by the scaled step: fp32)
    placement_strategy: Literal["SPREAD", "PACK"] = "SPREAD"
    # where adaptation runs: a training group of num_train_workers ranks started once and kept for the run
    # (train_group), a Ray Train TorchTrainer per task (ray_train: start-up every task), or the coordinator itself
    adapt_on: Literal["train_group", "ray_train", "coordinator"] = "train_group"
    max_failures: int = 2  # restarts of the training ranks after one dies, each from the last epoch checkpoint
    # start every worker when the run starts (RayKernels.warm_up); false: in turn (the training ranks, which
    # `dmea run` launches from the driver either way, then behind the first adaptation the generation actors,
    # then the search actors: distributed/kernels.py).
    # None: at once where the roles have cores of their own (a cluster; an embedded Ray with cores to spare),
    # in turn where they take turns on the same cores
    warm_up: bool | None = None
    # search and generation on one pool of model replicas (max(num_search_workers, num_generation_actors) actors
    # of search_cpus each, which must equal generation_cpus): the stages take turns, so one set of replicas can
    # serve both, and one process fewer starts per replica saved (the pool's size does not change results).
    # None: shared where the roles take turns on the same cores (as warm_up), separate pools on a cluster
    shared_replicas: bool | None = None
    # Ray's dashboard on an embedded Ray (127.0.0.1 only); None: only where the run needs its State API
    # (adapt_on: ray_train, whose placement-group cleaner asks it). It costs ~2 s of CPU at start-up, which a
    # 2-core machine pays in wall time (docs/BENCHMARKS.md). A cluster keeps its own settings.
    dashboard: bool | None = None

    def __post_init__(self):
        if self.num_cpus is not None:
            _check_range("ray.num_cpus", self.num_cpus, 1, 100_000)
        for key in ("num_search_workers", "num_generation_actors", "num_train_workers"):
            if getattr(self, key) is not None:
                _check_range(f"ray.{key}", getattr(self, key), 1, 10_000)
        _check_range("ray.max_failures", self.max_failures, 0, 1000)
        for key in ("search_cpus", "generation_cpus", "train_cpus"):
            _check_range(f"ray.{key}", getattr(self, key), 0.01, 1024)
        if self.shared_replicas and self.search_cpus != self.generation_cpus:
            raise ConfigError(f"ray.shared_replicas runs search and generation on the same actors, but "
                              f"ray.search_cpus={self.search_cpus:g} and ray.generation_cpus={self.generation_cpus:g} "
                              f"differ: set them equal, or ray.shared_replicas=false")

    def sized(self, *, local_cores: int | None) -> RayConfig:
        """This section with what it leaves at None set for where the run is: `local_cores`, the cores of an
        embedded Ray, or None on a cluster. Search workers: one of `search_cpus` per core, or 1; warm_up:
        where the roles have cores of their own (a cluster), not where they take turns on the same cores;
        shared_replicas: where they take turns (and search and generation actors have the same CPUs);
        dashboard: where adaptation runs on Ray Train."""
        sized = self
        if self.num_search_workers is None:
            workers = 1 if local_cores is None else max(1, int(local_cores // self.search_cpus))
            sized = dataclasses.replace(sized, num_search_workers=workers)
        # whether every role has cores of its own, with a pool each for search and generation
        spare = local_cores is None or dataclasses.replace(sized, shared_replicas=False).reserved_cpus() <= local_cores
        if self.warm_up is None:
            sized = dataclasses.replace(sized, warm_up=spare)
        if self.shared_replicas is None:
            sized = dataclasses.replace(sized, shared_replicas=not spare and self.search_cpus == self.generation_cpus)
        if self.dashboard is None:
            sized = dataclasses.replace(sized, dashboard=self.adapt_on == "ray_train")
        return sized

    def reserved_cpus(self) -> float:
        """CPUs the roles reserve when all are up (their sizes set: `sized`)."""
        if self.shared_replicas:
            replicas = self.replicas() * self.search_cpus
        else:
            replicas = self.num_search_workers * self.search_cpus + self.num_generation_actors * self.generation_cpus
        return replicas + (self.num_train_workers * self.train_cpus if self.adapt_on != "coordinator" else 0)

    def replicas(self) -> int:
        """Actors of a shared search and generation pool (`shared_replicas`)."""
        return max(self.num_search_workers, self.num_generation_actors)

    def layout(self) -> str:
        """The roles' sizes in words (sizes set: `sized`), e.g. "search and generation 2 x 1 CPU (one pool),
        training 1 x 1"."""
        if self.shared_replicas:
            replicas = f"search and generation {self.replicas()} x {self.search_cpus:g} CPU (one pool)"
        else:
            replicas = (f"search {self.num_search_workers} x {self.search_cpus:g} CPU, generation "
                        f"{self.num_generation_actors} x {self.generation_cpus:g}")
        return f"{replicas}, training {self.num_train_workers} x {self.train_cpus:g}"


@dataclass(frozen=True)
class RunConfig:
    """One lifelong run: a task sequence, a model, a method and how to run it."""

    data: DataConfig
    name: str = "dmea"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    deepspeed: dict[str, Any] = field(default_factory=dict)  # DeepSpeed's own config, merged over defaults

    def __post_init__(self):
        _refuse_quoted_numbers(self.deepspeed, "deepspeed")
        _check_deepspeed(self.deepspeed)
        if self.model.token_rows in ("trained", "words") and _trains_whole_backbone(self.method.name):
            raise ConfigError(
                f"model.token_rows={self.model.token_rows!r} with method.name={self.method.name}: this method trains the whole "
                "backbone, every embedding row included, so there are no frozen rows to give its tasks; "
                "drop model.token_rows (or set it to 'frozen')")

    @property
    def token_rows_mode(self) -> str:
        """model.token_rows with "auto" resolved: "frozen", "trained" or "words"."""
        if self.model.token_rows == "auto":
            return "frozen" if _trains_whole_backbone(self.method.name) else "words"
        return self.model.token_rows

    @property
    def trains_token_rows(self) -> bool:
        """Whether tasks train any of the backbone's untrained token rows."""
        return self.token_rows_mode != "frozen"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _trains_whole_backbone(method: str) -> bool:
    return method_policy(method).full_finetune


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML run config and apply `key.sub=value` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see configs/ for examples")
    try:
        raw = typed_yaml.parse_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 (byte offset {err.start}); save the config as UTF-8") from None
    except yaml.YAMLError as err:  # one line: the parser's problem and its line, not its multi-line excerpt
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        hint = " (indent with spaces, not tabs)" if "'\\t'" in problem else ""
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}{hint}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data:, model:, ...)")
    for item in overrides or []:
        apply_override(raw, item, source=str(path))
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
    try:
        return typed_yaml.build(RunConfig, raw, prefix="", source=source)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def apply_override(raw: dict[str, Any], item: str, *, source: str = "") -> None:
    """Set `a.b.c=value` in a raw run config; the value is parsed as YAML (`3`, `true`, `[a, b]`), the key
    checked against RunConfig's fields. `source`: the config file the override applies to, named in errors."""
    typed_yaml.apply_override(raw, item, root=RunConfig, source=source)


def _refuse_quoted_numbers(node: Any, key: str) -> None:
    """A string that is only a number, in the untyped `deepspeed:` section, fails here by its dotted key.

    DeepSpeed would get `"1e-4"` and fail only at the first adaptation, after
    the backbone and the first task's search (module docstring).
    """
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_quoted_numbers(value, f"{key}.{name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _refuse_quoted_numbers(value, f"{key}[{i}]")
    elif isinstance(node, str) and _NUMBER_TEXT.match(node):
        raise ConfigError(f"{key}={node!r} is a string, DeepSpeed needs a number; write it without quotes "
                          f"({key.rsplit('.', 1)[-1]}: {node.strip()})")


# The top-level keys DeepSpeed's config reads (runtime/config.py, DeepSpeed 0.19-0.20, removed features included:
# DeepSpeed says why it refuses those). Any other key DeepSpeed ignores: `zero_optimisation: {stage: 2}` trained at
# ZeRO 1 without a word. tests/unit/test_review_config.py checks the list against the DeepSpeed installed
# (sequence_parallel_size: read only once torch.distributed is initialised, so found in a full suite only).
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet",
    "comms_logger", "communication_data_type", "compile", "compression_training", "csv_monitor",
    "curriculum_learning", "data_efficiency", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "sparse_attention",
    "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast",
    "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size",
    "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})
# The keys of its `zero_optimization` section (DeepSpeedZeroConfig's fields and their aliases): DeepSpeed refuses
# any other, but only when it builds the engine, at the first adaptation, as a pydantic traceback
DEEPSPEED_ZERO_KEYS = frozenset({
    "allgather_bucket_size", "allgather_partitions", "allgather_sequential", "compute_grad_norm",
    "contiguous_gradients", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint",
    "enable_sanity_checks", "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "leaf_module",
    "legacy_stage1", "load_from_fp32_weights", "log_trace_cache_warnings", "max_live_parameters",
    "max_reuse_distance", "memory_efficient_linear", "mics_hierarchical_params_gather", "mics_shard_size",
    "model_persistence_threshold", "module_granularity_threshold", "offload_optimizer", "offload_param",
    "overlap_comm", "override_module_apply", "param_persistence_threshold", "parameter_alignment",
    "pipeline_loading_checkpoint", "prefetch_bucket_size", "reduce_bucket_size", "reduce_scatter",
    "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage", "stage3_allgather_sequential",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_model_persistence_threshold",
    "stage3_module_granularity_threshold", "stage3_param_persistence_threshold", "stage3_prefetch_bucket_size",
    "stage3_use_all_reduce_for_fetch_params", "sub_group_size", "use_all_reduce_for_fetch_params",
    "use_multi_rank_bucket_allreduce", "zenflow", "zero_hpz_partition_size", "zero_quantized_gradients",
    "zero_quantized_nontrainable_weights", "zero_quantized_weights",
})


def _check_deepspeed(section: dict[str, Any]) -> None:
    """The `deepspeed:` section's keys, and what the gradient-scaled step needs of it (`check_scaled_step`),
    checked when the config loads: DeepSpeed would ignore an unknown key, and the rest failed at the first
    adaptation, after the first task's search, in a run a resume cannot mend (deepspeed.* may not change on
    resume). The CPU-only rule (optimizer.params.torch_adam) stays with the engine, which knows the device."""
    check_scaled_step(section, name=lambda *keys: ".".join(("deepspeed",) + keys), default_stage=1)
    if "optimizer" in section and not isinstance(section["optimizer"], dict):
        raise ConfigError(f"deepspeed.optimizer must be a mapping, got {section['optimizer']!r}")
    for keys, known, where, fate in (
            (section, DEEPSPEED_KEYS, "deepspeed.", "ignore it"),
            (section.get("zero_optimization") or {}, DEEPSPEED_ZERO_KEYS, "deepspeed.zero_optimization.",
             "refuse it at the first adaptation")):
        for key in keys:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean '{where}{close[0]}'?" if close else ""
                raise ConfigError(f"unknown key '{where}{key}'{hint} (DeepSpeed would {fate}; its keys: "
                                  "https://www.deepspeed.ai/docs/config-json/)")
    optimizer = section.get("optimizer")
    if optimizer is not None and "type" in optimizer and not isinstance(optimizer["type"], str):
        raise ConfigError(f"deepspeed.optimizer.type={optimizer['type']!r} must be the name of an optimizer, e.g. AdamW")


def check_scaled_step(section: dict[str, Any], *, name: Callable[..., str], default_stage: int) -> None:
    """What the gradient-scaled step needs of a DeepSpeed config, one rule set for the config's load
    (`deepspeed.` keys, default_stage 1: `deepspeed_config`'s) and `engine.build_engine` (`ds_config[..]`
    keys, default_stage 0: DeepSpeed's). name(*keys): how the caller's user writes the key."""
    for key in ("zero_optimization", "fp16", "bf16", "bfloat16"):
        if key in section and not isinstance(section[key], dict):
            raise ConfigError(f"{name(key)} must be a mapping, got {section[key]!r}")
    stage = section.get("zero_optimization", {}).get("stage", default_stage)
    if isinstance(stage, bool) or stage not in (1, 2, 3):
        raise ConfigError(f"{name('zero_optimization', 'stage')}={stage!r} is not accepted: the gradient-scaled step "
                          f"needs ZeRO stage 1, 2 or 3 (DeepSpeed's coalesced gradient reduction)")
    steps = section.get("gradient_accumulation_steps", 1)
    if isinstance(steps, bool) or steps != 1:
        raise ConfigError(f"{name('gradient_accumulation_steps')}={steps!r} is not accepted: it must be 1, one scaled "
                          f"step is one optimizer step over all its sub-batches (train.batch_size is the batch)")
    for key in ("fp16", "bf16", "bfloat16"):
        if section.get(key, {}).get("enabled", False):
            raise ConfigError(f"{name(key, 'enabled')} is set: the gradient-scaled step runs in fp32; remove the "
                              f"'{key}' section (train.autocast: bf16 gives bf16 matmuls)")


def _check_range(key: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:  # also refuses NaN (every comparison with NaN is False)
        raise ConfigError(f"{key}={value} is out of range; accepted: {low} <= {key.split('.')[-1]} <= {high}")


def deepspeed_config(user: dict[str, Any], *, lr: float, weight_decay: float, eps: float, grad_clip: float,
                     micro_batch: int) -> dict[str, Any]:
    """DeepSpeed's config: CPU-safe defaults (ZeRO 1, fp32, torch AdamW) deep-merged with the user's section."""
    defaults: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": 1},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "eps": eps, "weight_decay": weight_decay,
                                                   "torch_adam": True}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(defaults, user)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
