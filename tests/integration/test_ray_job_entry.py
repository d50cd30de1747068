"""`ray_jobs/run_sequence.py`, the `ray job submit` entry point, run by hand without an address: it starts an
embedded Ray sized as `dmea run` sizes it (one search worker per core, CPUs declared for every role), runs the
whole sequence and saves the sizes it used in the run's config."""

from __future__ import annotations

import pytest
import yaml

from tests.integration.tiny_run import tiny_config

pytestmark = pytest.mark.integration


def test_the_job_entry_point_sizes_an_embedded_ray_and_runs_the_sequence(tmp_path, monkeypatch, capsys):
    import ray

    from dmea_dist.distributed.cluster import machine_cores
    from ray_jobs.run_sequence import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    # two tasks: the second one searches, which needs the search pool's CPUs beside the long-lived pools'
    config = tiny_config(tmp_path, tracking={"enabled": False},
                         data={"tasks": ["synth.hotel.00", "synth.hotel.01"], "synth_sizes": [64, 12, 12]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert not ray.is_initialized()
    try:
        rc = main([str(path), "--run-dir", str(tmp_path / "run")])
    finally:
        ray.shutdown()
    assert rc == 0
    assert "final_average=" in capsys.readouterr().out
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["ray"]
    assert saved["num_search_workers"] == machine_cores() and saved["warm_up"] is False
