"""The four heavy kernels of a run, as one protocol with typed requests, and their in-process form.

Stages (dmea_dist.stages) decide what to compute; kernels compute it:

    search(model, jobs, data)    expansion candidates      -> [CandidateResult]
    generate(model, requests)    pseudo samples            -> [PseudoSamples]
    answer(model, requests)      greedy/top-k answers      -> [[str]] (the R row)
    adapt(model, job, ...)       DeepSpeed scaled steps    -> AdaptResult, trained weights in `model`

`InProcessKernels` runs them in this process; `dmea_dist.distributed.kernels.
RayKernels` runs the same functions as Ray work. Both are built from plain
settings (`EngineSettings`, `DecodingSettings`, dmea_dist.settings) resolved
from the config at the entry point: no worker ever receives a RunConfig.
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
import torch

from dmea_dist.data.formatting import BatchStream, Formatter
from dmea_dist.method.adaptation import AdaptJob, AdaptResult, run_adapt_job
from dmea_dist.method.expansion import CandidateResult, search_candidate
from dmea_dist.method.generation import (
    PseudoSamples,
    SampleWant,
    generate_answers,
    generate_pseudo_samples_of,
    merge_reasons,
)
from dmea_dist.settings import DecodingSettings, EngineSettings

Progress = Callable[[str, int, int], None]


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class SearchJob:
    """One expansion candidate: its seed, entropy weight and initial logits (per layer, new module last)."""

    candidate: int
    seed: int
    entropy_weight: float
    init: list[list[float]]
    params: dict[str, Any] = field(default_factory=dict)  # what to record: beta, seed, ...


@dataclass(frozen=True)
class SearchData:
    """What every candidate of one search shares: the new task's data and the optimisation settings."""

    train: BatchStream
    val_batches: list[tuple[dict, dict]]
    epochs: float
    warmup_epochs: float
    lr: float
    coefficient_lr: float | None
    lm_lambda: float
    token_weights: dict[int, float] | None
    weight_decay: float
    adam_eps: float
    grad_clip: float


@dataclass(frozen=True)
class GenerateRequest(SampleWant):
    """`n` pseudo samples of one earlier task from its generation token, along `path`, and the seed of
    the call (`generate_seed`)."""

    seed: int


@dataclass(frozen=True)
class AnswerRequest:
    """Answers to `rows` (context, question) along `path`, or along `paths` (one per row: several tasks
    in one request, each row through its own task's path); `scopes`: the token rows each row sees (its task's
    scope; None: every task's)."""

    task_id: str
    rows: list[dict]
    path: list[int] | None
    paths: list[list[int] | None] | None = None
    scopes: list[tuple[str, ...] | None] | None = None


class Kernels(Protocol):
    """The heavy work of a run (module docstring). `close` releases workers."""

    def search(self, model, jobs: Sequence[SearchJob], data: SearchData) -> list[CandidateResult]: ...

    def generate(self, model, requests: Sequence[GenerateRequest]) -> list[PseudoSamples]: ...

    def answer(self, model, requests: Sequence[AnswerRequest]) -> list[list[str]]: ...

    def adapt(self, model, job: AdaptJob, *, checkpoint_dir: Path | None = None) -> AdaptResult: ...

    def worker_memory(self) -> dict[str, float]:
        """The high-water resident memory (MiB) of each kind of worker process that holds a model ("training",
        "search", "generation", or "replicas" where one pool does both), the largest over its live processes;
        {} where every kernel runs in the caller's process, whose own figure is then the run's."""
        ...

    def close(self) -> None: ...


# ------------------------------------------------------------------ the kernels themselves


def process_memory() -> dict[str, float]:
    """This process's resident memory now and its high-water mark since it started, MiB."""
    return {"rss_mib": psutil.Process().memory_info().rss / 2**20,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # ru_maxrss: KiB on Linux


def run_search_job(model, job: SearchJob, data: SearchData) -> CandidateResult:
    """One candidate on `model` (mutated: pass a copy)."""
    return search_candidate(model, candidate=job.candidate, train=data.train, val_batches=data.val_batches,
                            init=[torch.tensor(x, dtype=torch.float32) for x in job.init], epochs=data.epochs,
                            warmup_epochs=data.warmup_epochs, entropy_weight=job.entropy_weight, lr=data.lr,
                            coefficient_lr=data.coefficient_lr, lm_lambda=data.lm_lambda,
                            token_weights=data.token_weights, weight_decay=data.weight_decay,
                            adam_eps=data.adam_eps, grad_clip=data.grad_clip, seed=job.seed, params=job.params)


def chunks(size: int, chunk: int) -> list[tuple[int, int]]:
    """[start, stop) of the fixed-size pieces of `size` items (the last one shorter)."""
    return [(start, min(size, start + chunk)) for start in range(0, size, chunk)]


def mixed_seed(*parts: int) -> int:
    """A seed fixed by `parts` alone (say run seed, task, candidate): a hashed stream, so that neighbouring
    parts (seed 1 of task 0 and seed 0 of task 1) do not collide as sums would. Give each kind of stream a
    fixed number of parts: numpy's SeedSequence pads its entropy with zeros, so (a, b, 0) and (a, b) are one
    seed."""
    state = np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1, dtype=np.uint64)[0]
    return int(state) % 2**63


def derive_seed(seed: int, part: int) -> int:
    """The seed of piece `part` of a request: the request's own for part 0, else a hashed stream."""
    return int(seed) if part == 0 else mixed_seed(seed, part)


def generate_seed(requests: Sequence[GenerateRequest]) -> int:
    """The seed of one generate call: its request's own for a single request, else a hash of all of them."""
    if len(requests) == 1:
        return int(requests[0].seed)
    return mixed_seed(*(r.seed for r in requests))


def run_generate_requests(model, formatter: Formatter, requests: Sequence[GenerateRequest],
                          decoding: DecodingSettings, parts: range | None = None) -> list[PseudoSamples]:
    """Every request's pseudo samples (one PseudoSamples each, in order), made piece by piece.

    The requests' samples are laid end to end and cut into pieces of
    `decoding.batch_size`; a piece may hold the tail of one task and the head
    of the next, and generates them in one batch (`generate_pseudo_samples_of`),
    seeded by the call and the piece (`parts`: only those pieces). A piece
    depends on the call alone, so any pool of actors that runs the pieces
    returns exactly these samples, whatever its size; and a call of many small
    requests costs about as many `generate` calls as its samples fill batches.
    """
    pieces = chunks(sum(r.n for r in requests), decoding.batch_size)
    offsets = np.cumsum([0] + [r.n for r in requests]).tolist()
    seed = generate_seed(requests) if requests else 0
    made: list[list[PseudoSamples]] = [[] for _ in requests]
    for part in parts if parts is not None else range(len(pieces)):
        start, stop = pieces[part]
        mine = [(i, min(stop, offsets[i + 1]) - max(start, offsets[i])) for i in range(len(requests))
                if offsets[i] < stop and offsets[i + 1] > start]
        wants = [replace(requests[i], n=n) for i, n in mine]
        outs = generate_pseudo_samples_of(model, formatter, wants, top_k=decoding.pseudo_top_k,
                                          batch_size=decoding.batch_size, seed=derive_seed(seed, part),
                                          answer=decoding.pseudo_answer, separator=decoding.pseudo_separator)
        for (i, _), out in zip(mine, outs, strict=True):
            made[i].append(out)
    return [merge_pseudo_samples(request, out) for request, out in zip(requests, made, strict=True)]


def merge_pseudo_samples(request: GenerateRequest, parts: Sequence[PseudoSamples]) -> PseudoSamples:
    return PseudoSamples(task_id=request.task_id, rows=[row for p in parts for row in p.rows],
                         malformed=sum(p.malformed for p in parts), generated=sum(p.generated for p in parts),
                         requested=request.n, truncated=sum(p.truncated for p in parts),
                         reasons=merge_reasons(p.reasons for p in parts))


def run_answer_request(model, formatter: Formatter, request: AnswerRequest, decoding: DecodingSettings,
                       parts: range | None = None) -> list[str]:
    """Answers of `request.rows`, a batch (piece) at a time, each seeded by its position (top-k
    decoding; `parts`: only those batches): the same answers whichever actor runs which batches."""
    pieces = chunks(len(request.rows), decoding.batch_size)
    answers: list[str] = []
    for part in parts if parts is not None else range(len(pieces)):
        start, stop = pieces[part]
        routing = {"path": request.path} if request.paths is None else {"paths": request.paths[start:stop]}
        if request.scopes is not None:
            routing["scopes"] = request.scopes[start:stop]
        answers += generate_answers(model, formatter, request.rows[start:stop], **routing,
                                    batch_size=decoding.batch_size, max_new_tokens=decoding.max_new_tokens,
                                    decoding=decoding.decoding, top_k=decoding.top_k,
                                    seed=derive_seed(decoding.seed, part))
    return answers


class InProcessKernels:
    """Every kernel in this process (tests, debugging, `dmea run --in-process`)."""

    def __init__(self, formatter: Formatter, *, engine: EngineSettings, decoding: DecodingSettings,
                 progress: Progress | None = None):
        self.formatter = formatter
        self.engine = engine
        self.decoding = decoding
        self.progress = progress or (lambda label, done, total, **info: None)

    def search(self, model, jobs: Sequence[SearchJob], data: SearchData) -> list[CandidateResult]:
        results = []
        for k, job in enumerate(jobs):
            self.progress("search", k, len(jobs))
            results.append(run_search_job(copy.deepcopy(model), job, data))
        self.progress("search", len(jobs), len(jobs))
        return results

    def generate(self, model, requests: Sequence[GenerateRequest]) -> list[PseudoSamples]:
        n_pieces = len(chunks(sum(r.n for r in requests), self.decoding.batch_size))
        parts: list[list[PseudoSamples]] = [[] for _ in requests]
        for part in range(n_pieces):
            self.progress("generate", part, n_pieces)
            for k, out in enumerate(run_generate_requests(model, self.formatter, requests, self.decoding,
                                                          parts=range(part, part + 1))):
                parts[k].append(out)
        self.progress("generate", n_pieces, n_pieces)
        return [merge_pseudo_samples(r, p) for r, p in zip(requests, parts, strict=True)]

    def answer(self, model, requests: Sequence[AnswerRequest]) -> list[list[str]]:
        out = []
        for k, request in enumerate(requests):
            self.progress("evaluate", k, len(requests))
            out.append(run_answer_request(model, self.formatter, request, self.decoding))
        return out

    def adapt(self, model, job: AdaptJob, *, checkpoint_dir: Path | None = None) -> AdaptResult:
        # DeepSpeed moves the model it trains onto its accelerator (a GPU where the machine has one, ZeRO 1/2
        # train in place); the other stages here build their batches on the CPU: the model goes back after
        device = next(model.parameters()).device
        try:
            return run_adapt_job(model, job, engine_factory=self.engine.factory(), checkpoint_dir=checkpoint_dir,
                                 on_step=lambda done, total, **info: self.progress("adapt", done, total, **info))
        finally:
            model.to(device)

    def worker_memory(self) -> dict[str, float]:
        return {}  # no workers: the coordinator's process is the run's

    def close(self) -> None:
        pass
