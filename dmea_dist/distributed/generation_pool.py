"""A pool of Ray generation actors: pseudo samples (GENERATE) and answers (EVALUATE).

`GenerationPool` holds `num_actors` `GenerationWorker` actors, each with one
model replica, the tokenizer and the formatter, in a placement group of one
`{CPU: cpus}` bundle per actor (SPREAD by default, so replicas land on
different nodes). It is started lazily from the coordinator's model at the
first call and then reused.

Key decisions:
- Work is cut into pieces of one batch (`decoding.batch_size` samples or
  rows), each computed with its own seed (`kernels.derive_seed(seed,
  piece)`), in process exactly as here (`kernels.run_answer_request`,
  `kernels.run_generate_requests`; a generate call's pieces run over all its
  requests laid end to end, so small requests share batches). The plan
  (`plan_shards`) only groups pieces into contiguous runs and gives each run
  to the least-loaded actor: it decides where work runs, never what it
  returns. So pseudo samples and answers (top-k ones too) are the same with 1,
  2 or 8 actors and in process, and a call is deterministic. Pseudo samples
  come back per run as a `pyarrow.Table` with `PSEUDO_SCHEMA` (plain Arrow
  columns) plus their malformed/generated counts.
- Model sync: before every call the pool sends, in one `ray.put` read by all
  actors, the module pools, the paths and `next_ids` (small); the backbone
  only when it may have changed: always for full fine-tuning
  (`always_sync_backbone`), or when a checksum of its weights (sum and
  norm per tensor: one vectorised pass, ~30 ms for GPT-2 small) differs from
  the last one sent.
- The tokenizer travels as its saved files' bytes (`tokenizer_files`): an
  actor on another node cannot read the run directory on the driver's disk.
- If an actor dies mid-call (process or node lost), the pool is rebuilt and
  the call redone (`retries`); any other failure tears the pool down and is
  raised (a restarted actor would miss the state synced before its failure).
  An actor whose constructor raised (a bad snapshot, a missing file) fails its
  calls with ActorDiedError too, with `actor_init_failed` and the
  constructor's traceback in its message (Ray 2.60 restarts no actor for that,
  max_restarts or not, ray-project/ray#46746): it would fail again, so it is
  raised at once, as the constructor's own error where that is ours (a
  DmeaError: `raise_constructor_error`). Only actors started after other refs (`start(after=...)`),
  whose failure reads the same, get one rebuild, without them.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import torch
from ray.exceptions import RayActorError
from ray.util.placement_group import remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from transformers import GPT2LMHeadModel

from dmea_dist.data.formatting import Formatter
from dmea_dist.data.tokenizer import load_tokenizer
from dmea_dist.distributed.cluster import (
    RESERVE_TIMEOUT_S,
    configure_threads,
    gather,
    raise_constructor_error,
    reserve,
    worker_env,
)
from dmea_dist.kernels import (
    AnswerRequest,
    GenerateRequest,
    chunks,
    merge_pseudo_samples,
    process_memory,
    run_answer_request,
    run_generate_requests,
)
from dmea_dist.method.generation import PSEUDO_SCHEMA, PseudoSamples
from dmea_dist.modeling.io import modules_state, put_modules_state
from dmea_dist.modeling.model import DMEAModel
from dmea_dist.settings import DecodingSettings

try:  # skip random init of a backbone whose weights are loaded right after
    from transformers.initialization import no_init_weights  # transformers >= 5
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers.modeling_utils import no_init_weights

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Shard:
    """Pieces [first, last) of request `request`, items [start, stop), run by actor `actor`."""

    request: int
    first: int
    last: int
    start: int
    stop: int
    actor: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def plan_shards(sizes: Sequence[int], *, n_actors: int, chunk: int) -> list[Shard]:
    """Cut each request into pieces of `chunk` items, group them into <= n_actors contiguous runs, balance.

    Each piece is computed the same wherever it runs (`kernels.run_*_request`
    seed by piece), so the plan decides only where work runs, never what it
    returns. Runs go, in (request, run) order, to the actor with the least
    work so far (ties to the lowest index). Depends on the sizes only.
    """
    if n_actors < 1 or chunk < 1:
        raise ValueError(f"plan_shards needs n_actors >= 1 and chunk >= 1, got {n_actors} and {chunk}")
    load = [0] * n_actors
    shards = []
    for request, size in enumerate(sizes):
        pieces = chunks(size, chunk) or [(0, 0)]
        k = min(n_actors, len(pieces))
        bounds = [len(pieces) * i // k for i in range(k + 1)]
        for first, last in zip(bounds, bounds[1:], strict=False):
            start, stop = pieces[first][0], pieces[last - 1][1]
            actor = min(range(n_actors), key=lambda a: (load[a], a))
            load[actor] += stop - start
            shards.append(Shard(request, first, last, start, stop, actor))
    return shards


# --------------------------------------------------------------------- model state


def model_state(model, *, with_backbone: bool) -> dict[str, Any]:
    """What a replica needs to match `model`: every module (modeling.io's keys), paths, next_ids (+ backbone)."""
    return {"modules": modules_state(model), "paths": model.paths, "next_ids": list(model.next_ids),
            "backbone": model.backbone.state_dict() if with_backbone else None}


def apply_model_state(model, state: dict[str, Any]) -> None:
    """Make `model`'s modules, paths and next_ids (and backbone, if sent) those of `state`."""
    if state["backbone"] is not None:
        model.backbone.load_state_dict(state["backbone"], strict=True)
    for task_id in model.paths:
        model.remove_path(task_id)  # paths first: drop_modules refuses modules a path uses
    keep = {(int(key.split(".")[1]), int(key.split(".")[3])) for key in state["modules"] if key.startswith("layers.")}
    for layer in range(model.n_layers):
        model.drop_modules(layer, [m for m in model.module_ids(layer) if (layer, m) not in keep])
    model.clear_token_rows()  # token rows travel whole (modules_state of every module holds every task's)
    put_modules_state(model, state["modules"])
    model.next_ids[:] = list(state["next_ids"])
    for task_id, path in state["paths"].items():
        model.set_path(task_id, path)


def model_snapshot(model) -> dict[str, Any]:
    """Everything needed to rebuild `model` on any node: plain config and tensors, no live objects.

    The coordinator's model itself is not shipped: after ADAPT it carries
    what DeepSpeed attached to it (a patched `_apply` holding a process
    group), which does not pickle.
    """
    return {"config": model.backbone.config, "bottleneck": model.bottleneck, **model_state(model, with_backbone=True)}


def build_model(snapshot: dict[str, Any]) -> DMEAModel:
    """A fresh DMEAModel equal to the snapshotted one (weights, modules, paths, next_ids)."""
    with no_init_weights():
        backbone = GPT2LMHeadModel(copy.deepcopy(snapshot["config"]))
    backbone.tie_weights()  # skipping init also skipped tying the LM head to the embeddings
    model = DMEAModel(backbone, bottleneck=snapshot["bottleneck"])
    apply_model_state(model, snapshot)
    return model


@torch.no_grad()
def backbone_checksum(model) -> tuple[float, ...]:
    """Per backbone tensor, its sum and norm: a change detector (~30 ms for GPT-2 small on one core).

    float32 reductions, vectorised; a false "changed" only costs one backbone transfer.
    """
    out: list[float] = []
    for tensor in model.backbone.state_dict().values():
        t = tensor if tensor.is_floating_point() else tensor.float()
        out += [float(t.sum()), float(torch.linalg.vector_norm(t))]
    return tuple(out)


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """The tokenizer's `save_pretrained` files as {relative name: bytes} (shippable to any node)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.relative_to(tmp).as_posix(): p.read_bytes() for p in Path(tmp).rglob("*") if p.is_file()}


def load_tokenizer_files(files: dict[str, bytes]):
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).write_bytes(data)
        return load_tokenizer(tmp)


# -------------------------------------------------------------------------- actor


class GenerationWorker:
    """One model replica (run as a Ray actor; plain class, so it also runs in-process)."""

    def __init__(self, snapshot: dict[str, Any], files: dict[str, bytes], *after: Any, max_length: int,
                 cpus: float, decoding: DecodingSettings):
        """`after`: values of the refs the pool made this actor wait for (Ray starts it once they are), unused."""
        configure_threads(cpus)
        self.model = build_model(snapshot)
        self.formatter = Formatter(load_tokenizer_files(files), max_length=max_length)
        self.decoding = decoding

    def sync(self, state: dict[str, Any]) -> None:
        apply_model_state(self.model, state)

    def pseudo_samples(self, requests: list[GenerateRequest], parts: range) -> list[dict[str, Any]]:
        """Pieces `parts` of one generate call (`run_generate_requests`): per request, what they made."""
        outs = run_generate_requests(self.model, self.formatter, requests, self.decoding, parts=parts)
        return [{"table": pa.Table.from_pylist(out.rows, schema=PSEUDO_SCHEMA), "malformed": out.malformed,
                 "generated": out.generated, "truncated": out.truncated, "reasons": out.reasons} for out in outs]

    def answers(self, request: AnswerRequest, parts: range) -> list[str]:
        return run_answer_request(self.model, self.formatter, request, self.decoding, parts=parts)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def memory(self) -> dict[str, float]:
        return process_memory()


def _received(request: GenerateRequest, out: dict[str, Any]) -> PseudoSamples:
    """What one actor's pieces made for `request` (`GenerationWorker.pseudo_samples`), as PseudoSamples."""
    return PseudoSamples(task_id=request.task_id, rows=out["table"].to_pylist(), malformed=out["malformed"],
                         generated=out["generated"], truncated=out["truncated"], reasons=out["reasons"])


# --------------------------------------------------------------------------- pool


class GenerationPool:
    """`num_actors` replicas that share generation work (see module docstring)."""

    worker_class: type = GenerationWorker  # the actors' class (distributed/search.py's pool runs candidates)
    role = "the generation pool"  # what its placement group is for, in a failed reservation's error

    def __init__(self, *, tokenizer, max_length: int, decoding: DecodingSettings, num_actors: int = 1,
                 cpus: float = 1.0, strategy: str = "SPREAD", always_sync_backbone: bool = False,
                 ready_timeout_s: float = RESERVE_TIMEOUT_S, retries: int = 1):
        if num_actors < 1 or cpus <= 0:
            raise ValueError(f"GenerationPool needs num_actors >= 1 and cpus > 0, got {num_actors} and {cpus}")
        self.tokenizer, self.max_length, self.decoding = tokenizer, max_length, decoding
        self.num_actors, self.cpus, self.strategy = num_actors, cpus, strategy
        self.always_sync_backbone, self.ready_timeout_s = always_sync_backbone, ready_timeout_s
        self.retries = retries
        self.restarts = 0  # calls redone because a replica died
        self.actors: list = []
        self._pg = None
        self._after = False  # the actors were started after other refs (`start(after=...)`)
        self._checksum: tuple[float, ...] | None = None  # of the backbone the replicas hold

    @property
    def started(self) -> bool:
        return bool(self.actors)

    def start(self, model, *, after: Sequence = ()) -> None:
        """Create the actors from `model` (one ray.put of its snapshot and of the tokenizer files), without
        waiting for them; with `after` (object refs), their processes start once those are ready."""
        self._pg = reserve(self.num_actors, cpus=self.cpus, strategy=self.strategy,
                           timeout_s=self.ready_timeout_s, what=self.role)
        model_ref, files_ref = ray.put(model_snapshot(model)), ray.put(tokenizer_files(self.tokenizer))
        cls = ray.remote(self.worker_class)
        self.actors = [
            cls.options(num_cpus=self.cpus, num_gpus=0, runtime_env={"env_vars": worker_env(self.cpus)},
                        scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i))
            .remote(model_ref, files_ref, *after, max_length=self.max_length, cpus=self.cpus, decoding=self.decoding)
            for i in range(self.num_actors)
        ]
        self._checksum, self._after = backbone_checksum(model), bool(after)

    def sync(self, model) -> None:
        """Bring every replica to `model`'s state (starting the pool if needed)."""
        if not self.started:
            self.start(model)  # the replicas are `model` as of now
            return
        checksum = backbone_checksum(model)
        with_backbone = self.always_sync_backbone or checksum != self._checksum
        ref = ray.put(model_state(model, with_backbone=with_backbone))  # one copy, read by every actor
        ray.get([actor.sync.remote(ref) for actor in self.actors])  # a failed sync must not go unnoticed
        self._checksum = checksum

    def generate(self, model, requests: Sequence[GenerateRequest], *,
                 progress: Progress | None = None) -> list[PseudoSamples]:
        """One PseudoSamples per request: rows of its pieces in order, counts summed.

        The call's samples, laid end to end, are one run of pieces
        (`run_generate_requests`): a piece may mix the tail of one task and the
        head of the next, so many small requests share batches.
        """
        requests = list(requests)
        shards = plan_shards([sum(r.n for r in requests)], n_actors=self.num_actors,
                             chunk=self.decoding.batch_size)
        outs = self._run(model, [s for s in shards if s.size > 0], lambda s: self.actors[s.actor].pseudo_samples.remote(
            requests, range(s.first, s.last)), label="generate", progress=progress)
        # merged as in process (kernels.run_generate_requests): the counts of what was asked, not what came out
        return [merge_pseudo_samples(req, [_received(req, outs[s][index]) for s in shards if s in outs])
                for index, req in enumerate(requests)]

    def answer(self, model, requests: Sequence[AnswerRequest], *,
               progress: Progress | None = None) -> list[list[str]]:
        """Answers of every request's rows, in row order; ranges cut at batch boundaries."""
        shards = plan_shards([len(r.rows) for r in requests], n_actors=self.num_actors,
                             chunk=self.decoding.batch_size)
        outs = self._run(model, [s for s in shards if s.size > 0], lambda s: self.actors[s.actor].answers.remote(
            requests[s.request], range(s.first, s.last)), label="evaluate", progress=progress)
        answers: list[list[str]] = [[] for _ in requests]
        for shard in shards:
            answers[shard.request].extend(outs.get(shard, []))
        return answers

    def _run(self, model, work: Sequence, submit: Callable, *, label: str,
             progress: Progress | None) -> dict[Any, Any]:
        """Sync, submit every item of `work` (`submit(item)` -> a ref), gather: {item: output}.

        A replica that dies mid-call (its process or node lost) fails the call;
        the pool is then rebuilt from `model` and the whole call redone, up to
        `retries` times: every item's result is a function of the item alone
        (a shard: its request and seed), so the redone call returns what the
        first would have.
        """
        if not work:
            return {}
        for attempt in range(self.retries + 1):
            try:
                self.sync(model)
                outs = gather([submit(s) for s in work], label=label, progress=progress)
                return dict(zip(work, outs, strict=True))
            except RayActorError as err:
                # a constructor's error would recur (module docstring), unless the refs the actors waited on failed
                constructor = err.actor_init_failed and not self._after
                self.shutdown()  # a dead replica: start the pool afresh from `model` and redo the call
                if constructor or attempt == self.retries:
                    raise_constructor_error(err)  # ours in one line, else Ray's error as it came
                    raise
                self.restarts += 1
            except Exception:
                self.shutdown()  # a failed replica may have missed a sync: start afresh next call
                raise
        raise AssertionError("unreachable")

    def node_ids(self) -> list[str]:
        """The node each live actor runs on (starts nothing: empty if the pool is not started).

        Bookkeeping (the run's placement record), asked after a call has returned its results: an actor that
        died since (its process killed, its node lost) is left out, not raised, so the finished call's
        results stand; the next call meets the death and rebuilds the pool (`_run`).
        """
        nodes = []
        for ref in [actor.node_id.remote() for actor in self.actors]:
            try:
                nodes.append(ray.get(ref))
            except RayActorError:
                pass
        return nodes

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None
        self._checksum, self._after = None, False
