"""Ray job entry point: one lifelong task sequence on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python ray_jobs/run_sequence.py configs/rnnlg_e2e_abcde_tiny.yaml [--set key=value ...]
    ray job submit ... -- python ray_jobs/run_sequence.py --resume RUN_DIR     (continue a stopped run)

Under `--working-dir`, `output_dir` and a sqlite `tracking.uri` must be absolute
(`--set output_dir=/shared/runs --set tracking.uri=sqlite:////shared/mlflow.db`):
the job refuses relative ones, which would land in Ray's temporary copy of the
repository (launch/README.md).

Inside a job Ray is already running: `connect` joins it (RAY_ADDRESS is set
by the job supervisor). The story, top to bottom: load and validate the
config, join Ray, start the lifecycle coordinator actor and step it, record
every task in MLflow from this process, print the R matrix and metrics.
For multi-node runs point `tracking.uri` at an MLflow server with proxied
artifacts (launch/README.md): this driver's local disk is not shared.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import ray

from dmea_dist.config import load_config
from dmea_dist.distributed.cluster import (
    capacity_note,
    embedded,
    logical_cpus,
    size_overrides,
    sized_for,
)
from dmea_dist.distributed.coordinator import connect, ray_coordinator_factory
from dmea_dist.driver import command_started, report_error, resume_sequence, run_sequence
from dmea_dist.errors import DmeaError
from dmea_dist.offline import no_downloads
from dmea_dist.preflight import check_input, check_job_paths, check_resume, resume_config, run_lock
from dmea_dist.state import load_state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="a YAML run config (configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--run-dir", help="where the run's files go on the driver's node")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its last finished stage")
    args = parser.parse_args(argv)
    no_downloads()
    if bool(args.config) == bool(args.resume):
        parser.error("give a config to start a run, or --resume RUN_DIR to continue one")
    try:
        config = resume_config(Path(args.resume), args.set) if args.resume else load_config(args.config, args.set)
        check_job_paths(config)  # a relative output path would write into the job's temporary copy
        if not args.resume:
            check_input(config)  # bad input fails here, in one line, before the cluster does any work
        else:  # as `dmea resume`: a store that cannot be used fails now, not silently
            check_resume(args.resume, config)
        # as `dmea resume`: a run still running is refused now, not once Ray is joined
        with run_lock(Path(args.resume), resume=True) if args.resume else contextlib.nullcontext():
            if args.resume and load_state(args.resume).done:  # as `dmea resume`: its results need no Ray
                result = resume_sequence(args.resume, overrides=args.set, check=False, started=command_started())
            else:
                result = _on_ray(args, config)
    except DmeaError as err:
        return report_error(err)  # an error of the coordinator actor as its cause, in one line, as `dmea` does
    except ray.exceptions.RayError as err:  # `ray stop`, a dead node: the run's hint (if any) is printed already
        lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
        detail = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "")
        print(f"error: Ray lost a part of the run ({type(err).__name__}: {detail})", file=sys.stderr)
        return 1
    print(f"final_average={result.metrics['final_average']:.2f} parent_run_id={result.parent_run_id}", flush=True)
    return 0


def _on_ray(args, config):
    """Start or continue the run with its coordinator and workers on Ray."""
    # inside `ray job submit` (RAY_ADDRESS set): the job's cluster, unset sizes 1 each; run by hand without
    # an address: an embedded Ray sized as `dmea run` sizes it
    sized = sized_for(config.ray, config.ray.address)
    where = connect(config.ray.address, num_cpus=logical_cpus(sized), dashboard=sized.dashboard)
    print(f"ray: {where} ({sized.layout()})", flush=True)  # the CPUs the run's roles will reserve
    if not embedded(config.ray.address) and (note := capacity_note(sized, ray.cluster_resources())):
        print(f"warning: {note}", file=sys.stderr, flush=True)  # now, not after the pools' wait
    overrides = args.set + size_overrides(config.ray, sized)
    config = dataclasses.replace(config, ray=sized)
    if args.resume:
        return resume_sequence(args.resume, overrides=overrides, coordinator_factory=ray_coordinator_factory,
                               check=False, saved=args.set,  # not the sizes this cluster gave unset keys
                               started=command_started())
    return run_sequence(config, run_dir=args.run_dir, coordinator_factory=ray_coordinator_factory, check=False,
                        started=command_started())


if __name__ == "__main__":
    sys.exit(main())
