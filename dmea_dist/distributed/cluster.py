"""Joining Ray and the small pieces every kind of Ray worker shares.

* `connect`: an embedded local Ray (the default), or a cluster (address / $RAY_ADDRESS).
* `reserve`: a placement group that is ready, or a clear error saying what holds the CPUs.
* `worker_env` / `configure_threads`: CPU workers use CPU DeepSpeed and as many torch
  threads as the CPUs they reserved: more threads than cores makes every worker slower.
* `gather`: results in submission order, progress as they finish in any order, the first failure at once.
* `actors_peak_memory`: the largest high-water memory of each role's actors (the run's per-task record).
* `raise_constructor_error`: the error an actor's constructor raised, where it is ours, instead of Ray's
  ActorDiedError.

Embedded Ray runs its own dashboard on 127.0.0.1 where the run needs one
(`ray.dashboard`; by default with `adapt_on: ray_train`) and tells every worker
where it is (RAY_API_SERVER_ADDRESS). Why: Ray Train's placement-group
cleaner (a detached actor) asks the State API whether the training controller
is alive (`ray.util.state.get_actor`). With no address it auto-detects "the"
local cluster from /tmp/ray/ray_current_cluster, i.e. the cluster started
most recently on the machine. When another Ray cluster starts there during a
run (tests, a second user), the cleaner asks *that* cluster, which has never
heard of our controller, concludes it is dead and removes the training
placement group under a live run ("Destroying worker since its placement
group was removed", ray/train/v2/_internal/execution/controller/
placement_group_cleaner.py, state/util.py `is_actor_alive`). Pinning the API
server address makes the answer come from our own cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import placement_group, remove_placement_group

from dmea_dist.errors import ClusterTooSmall, DmeaError
from dmea_dist.offline import OFFLINE_VARS
from dmea_dist.rendezvous import free_port

Progress = Callable[[str, int, int], None]
_dashboard_url: str | None = None  # of the embedded Ray `connect` started, if it has a dashboard


def connect(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = False) -> str:
    """Start an embedded local Ray, or join the cluster at `address` / $RAY_ADDRESS; returns which.

    dashboard: whether an embedded Ray starts Ray's dashboard, with its State and Job APIs (Ray Train needs
    the State API: module docstring). Without it Ray's head runs no dashboard modules (~2 s less CPU at
    start-up). A cluster keeps its own.
    """
    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"TOKENIZERS_PARALLELISM": "false", **{var: "1" for var in OFFLINE_VARS}}  # workers download nothing
    if os.environ.get("DS_ACCELERATOR"):
        env["DS_ACCELERATOR"] = os.environ["DS_ACCELERATOR"]
    for var in _job_env_vars():  # the job's own reach every worker; set again, ray.init refuses them
        env.pop(var, None)
    # Worker logs stay in Ray's log folder unless asked for: the driver prints progress and results itself,
    # and errors come back through ray.get.
    logs = os.environ.get("DMEA_RAY_LOGS", "0") == "1"
    global _dashboard_url
    _dashboard_url = None  # an earlier embedded Ray's, gone with it
    if address:
        with _command_keeps_sigterm():
            ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=logs)
        return address
    port = free_port()
    if dashboard:
        env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"  # module docstring: our State API only
    # address="local": always a new cluster of our own. Without it ray.init joins "the" cluster of the machine
    # (/tmp/ray/ray_current_cluster), someone else's, or fails on a stale file a dead one left behind.
    with _quiet_token_notice(), _hangup_blocked(), _command_keeps_sigterm():
        context = ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                           dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env},
                           log_to_driver=logs)
    _dashboard_url = f"http://{context.dashboard_url}" if dashboard and context.dashboard_url else None
    return "local"


@contextlib.contextmanager
def _command_keeps_sigterm() -> Iterator[None]:
    """SIGTERM keeps the handler the command set before Ray (`stops.exit_on_termination`: exit 143 through the
    command's cleanup). `ray.init` replaces it with Ray's driver handler (`sys.exit(15)`) and a C++ one beneath that
    prints `*** SIGTERM received` and a stack; `signal.signal` sets Python's again. Where no Python handler was set
    (a Ray job's entry point before it drives, a library caller), Ray's stays."""
    kept = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(kept):
            with contextlib.suppress(ValueError):  # not the main thread: Ray set none either
                signal.signal(signal.SIGTERM, kept)


@contextlib.contextmanager
def _hangup_blocked() -> Iterator[None]:
    """SIGHUP blocked in the processes an embedded Ray starts now (a blocked signal stays blocked across fork and
    exec), as Ray blocks SIGINT in them (ray/_private/services.py `start_ray_process`): its GCS, raylet and agents
    are in the driver's process group, to which the shell sends SIGHUP when the terminal closes, and died of it
    before the driver could mark the run stopped through its coordinator actor. They end with the driver, as
    before. A SIGHUP to the driver meanwhile waits, and arrives as this ends."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _job_env_vars() -> set[str]:
    """The variables a Ray job's runtime env sets (`ray job submit --runtime-env-json '{"env_vars": ...}'`, a
    RayJob's runtimeEnvYAML). Ray hands the job's entry point its runtime env in RAY_JOB_CONFIG_JSON_ENV_VAR
    (ray/dashboard/modules/job/job_supervisor.py) and `ray.init` merges it with its own `runtime_env`, failing
    on any variable both set, even to the same value (ray/runtime_env/runtime_env.py `_merge_runtime_env`):
    a job that sets DS_ACCELERATOR=cpu on GPU nodes, or HF_HUB_OFFLINE, failed at connect."""
    from dmea_dist.preflight import job_runtime_env

    env_vars = job_runtime_env().get("env_vars")
    return set(env_vars) if isinstance(env_vars, dict) else set()


@contextlib.contextmanager
def _quiet_token_notice() -> Iterator[None]:
    """Drop Ray's notice that it turned token authentication on for a new local cluster (its default; it stays
    on), printed in every `dmea run`. Set RAY_AUTH_MODE and Ray does as it says, without the notice; every
    other message of Ray's, its warning that authentication is off included, passes."""
    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def ray_dashboard_url() -> str | None:
    """Where the dashboard of the embedded Ray that `connect` started listens (http://127.0.0.1:PORT), if it
    started one, while it runs."""
    return _dashboard_url if ray.is_initialized() else None


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def embedded(address: str | None) -> bool:
    """Whether `connect(address)` starts an embedded local Ray (no address, no $RAY_ADDRESS)."""
    return not (address or os.environ.get("RAY_ADDRESS"))


def sized_for(sizes, address: str | None):
    """`sizes` (the config's `ray:` section) with what it leaves unset filled for where `address` runs: an
    embedded local Ray with the machine's cores (or `ray.num_cpus`), or a cluster (`RayConfig.sized`)."""
    return sizes.sized(local_cores=(sizes.num_cpus or machine_cores()) if embedded(address) else None)


def size_overrides(before, after) -> list[str]:
    """`--set ray.KEY=VALUE` for each size `after` sets that `before` left unset (resuming a run whose saved
    config has none: one started in process)."""
    keys = ("num_search_workers", "warm_up", "shared_replicas", "dashboard")
    return [f"ray.{k}={getattr(after, k)}" for k in keys if getattr(before, k) is None]


def logical_cpus(sizes) -> int:
    """CPUs an embedded Ray declares for a run sized by `sizes` (the config's `ray:` section).

    The generation pool and the training group live for the run and keep their
    reservations, and search candidates need theirs; but the stages run one
    after another, so these roles take turns on the machine's cores (or the
    `ray.num_cpus` it was given, which `sized_for` sizes them for). Declaring
    at least the sum lets all of them be placed at once, each still using only
    the threads it reserved (`worker_env`).
    """
    return max(sizes.num_cpus or machine_cores(), int(sizes.sized(local_cores=None).reserved_cpus() + 0.999))


RESERVE_TIMEOUT_S = 120.0  # how long a pool waits for its placement group (the pools' ready_timeout_s)


def capacity_note(sizes, resources: dict[str, float], *, stop: str = "ray job stop") -> str | None:
    """A line saying the cluster (`resources`: ray.cluster_resources()) has fewer CPUs or GPUs than the run's
    roles reserve together (`sizes` sized), and which `--set`s fit it; None when it fits. The roles reserve
    when the run starts, so a cluster that stays that small fails after RESERVE_TIMEOUT_S, while an
    autoscaler may still add nodes: said at once, not refused. `stop`: how to stop the run."""
    need = {"CPU": sizes.reserved_cpus()}
    if sizes.use_gpu and sizes.adapt_on != "coordinator":
        need["GPU"] = float(sizes.num_train_workers)
    short = {key: amount for key, amount in need.items() if resources.get(key, 0.0) + 1e-9 < amount}
    if not short:
        return None
    fixes = []
    if not sizes.shared_replicas and sizes.search_cpus == sizes.generation_cpus:
        fixes.append("--set ray.shared_replicas=true (search and generation share one pool)")
    fixes.append("fewer ray.num_train_workers, ray.num_search_workers, ray.num_generation_actors or their *_cpus")
    fixes.append("add nodes")
    has = " and ".join(f"{resources.get(key, 0.0):g} {key}s" for key in short)
    return (f"the run reserves {' and '.join(f'{need[key]:g} {key}s' for key in short)} ({sizes.layout()}) and "
            f"the cluster has {has}: unless nodes join within {RESERVE_TIMEOUT_S:g} s it fails then; stop it "
            f"({stop}) and start it again with {', or '.join(fixes)}")


def require_ray() -> None:
    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call ray.init() (or connect to the cluster) before using "
                           "Ray kernels, e.g. ray.init(num_cpus=2) on a laptop")


def worker_env(cpus: float, *, gpu: bool = False) -> dict[str, str]:
    """Environment of every worker process: threads = the CPU share, and DeepSpeed's accelerator said outright,
    CUDA for a rank that holds a GPU (`gpu`), else CPU. Said, not left to DeepSpeed or to the job: a worker
    inherits the driver's DS_ACCELERATOR (`connect`), `cpu` where the driver runs on the project's image or
    from the Makefile, which would have GPU ranks build CPU engines; an actor's own env_vars win over the
    job's (checked on Ray 2.60)."""
    return {"DS_ACCELERATOR": "cuda" if gpu else "cpu", "OMP_NUM_THREADS": str(max(1, int(cpus))),
            "TOKENIZERS_PARALLELISM": "false"}


def configure_threads(cpus: float | None = None) -> None:
    """Threads = the CPU share of this process (no oversubscription under Ray)."""
    import torch  # here, not at the top: the driver imports this module before Ray starts, and needs no torch

    torch.set_num_threads(max(1, int(cpus or os.cpu_count() or 1)))


RESERVE_QUIET_S = 10.0  # a reservation not placed by then is said to be waiting, and on what


def reserve(n_bundles: int, *, cpus: float, strategy: str, timeout_s: float, what: str,
            bundle: dict[str, float] | None = None):
    """A ready placement group of `n_bundles` x {CPU: cpus} (or x `bundle`), or a clear error naming what
    each bundle asks for and how much of each of those resources is free (a GPU bundle may lack GPUs only)."""
    bundle = bundle or {"CPU": float(cpus)}
    pg = placement_group([bundle] * n_bundles, strategy=strategy)
    shape = ", ".join(f"{key}: {amount:g}" for key, amount in bundle.items())

    def free() -> str:
        available, total = ray.available_resources(), ray.cluster_resources()
        return " and ".join(f"{available.get(key, 0.0):g} of {total.get(key, 0.0):g} {key}s" for key in bundle)

    first = min(RESERVE_QUIET_S, timeout_s)
    try:
        ready = pg.wait(timeout_seconds=first)
        if not ready and timeout_s > first:  # say why nothing happens (an autoscaler may still add nodes)
            print(f"waiting for {n_bundles} x {{{shape}}} ({strategy}) for {what}: the cluster has {free()} free; "
                  f"giving up after {timeout_s:.0f}s", file=sys.stderr, flush=True)
            ready = pg.wait(timeout_seconds=timeout_s - first)
    except BaseException:  # Ctrl-C while it waits: a pending group left behind would take the CPUs when they free
        remove_placement_group(pg)
        raise
    if not ready:
        remove_placement_group(pg)
        raise ClusterTooSmall(  # a DmeaError: one line from the CLI, and the run resumes on a bigger cluster
            f"could not reserve {n_bundles} x {{{shape}}} ({strategy}) for {what} within {timeout_s:.0f}s: "
            f"the cluster has {free()} free. Lower the number of workers or what each reserves, "
            f"add nodes, or release other holders (a live generation pool keeps its CPUs between calls)")
    return pg


def gather(refs: list, *, label: str, progress: Progress | None) -> list:
    """ray.get of `refs` in their order, reporting progress as they finish in any order. The first to fail
    raises at once (a dead actor: its pool is rebuilt and the call redone now, not after the others end)."""
    pending, values = list(refs), {}
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        values.update(zip(ready, ray.get(ready), strict=True))
        if progress:
            progress(label, len(values), len(refs))
    return [values[ref] for ref in refs]


def actors_peak_memory(workers: dict[str, list], *, wait_s: float = 1.0) -> dict[str, float]:
    """The largest high-water resident memory (MiB) of each role's actors (workers with `memory()`), asked
    all at once. Bookkeeping: an actor that died or failed to answer, or is still starting after `wait_s` (a pool
    warming up while the first task ends), is left out rather than waited for or raised; a role none of whose
    actors answered is absent."""
    refs = {actor.memory.remote(): role for role, actors in workers.items() for actor in actors}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s) if refs else ([], [])
    peaks: dict[str, float] = {}
    for ref in ready:
        with contextlib.suppress(RayError):
            peak = ray.get(ref)["peak_rss_mib"]
            peaks[refs[ref]] = max(peak, peaks.get(refs[ref], 0.0))
    return peaks


def raise_constructor_error(err: RayActorError) -> None:
    """Raise the DmeaError an actor's constructor raised, where `err` is the ActorDiedError (`actor_init_failed`)
    its calls failed with; return for any other death or error. It is then the CLI's one `error:` line, where
    the ActorDiedError was a traceback. Ray 2.60 keeps the error only as the `cause` of the creation task's
    RayTaskError, the ActorDiedError's one argument (ray/exceptions.py `ActorDiedError.__init__`); its message
    is that traceback."""
    cause = getattr(err.args[0], "cause", None) if err.actor_init_failed and err.args else None
    if isinstance(cause, DmeaError):
        raise cause from err
