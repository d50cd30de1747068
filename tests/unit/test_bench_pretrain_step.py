"""benchmarks/bench_pretrain_step.py times the quick start's backbone, not another model of its shape."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dmea_dist.config import load_config
from dmea_dist.run import load_tasks, tiny_backbone

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_pretrain_step.py"


def test_the_benchmarked_model_is_the_quick_starts_backbone(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_pretrain_step", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = load_config(str(ROOT / "configs" / "quickstart.yaml"),
                         [f"output_dir={tmp_path}", "model.tiny.pretrain.corpus=none", "tracking.enabled=false"])
    _, backbone = tiny_backbone(config, load_tasks(config), cache_root=tmp_path / "_cache")
    built = backbone.config
    for key, value in bench.MODEL.items():
        if key.endswith("_pdrop"):  # pretraining runs without dropout (pretrain_lm's dropout=0)
            continue
        assert getattr(built, key) == value, key
