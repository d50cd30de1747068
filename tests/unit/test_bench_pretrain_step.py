"""benchmarks/bench_pretrain_step.py times the quick start's backbone, not another model of its shape."""

from __future__ import annotations

from dmea_dist.config import load_config
from dmea_dist.run import load_tasks, tiny_backbone
from tests.unit.bench_script import ROOT, load_script


def test_the_benchmarked_model_is_the_quick_starts_backbone(tmp_path):
    bench = load_script("bench_pretrain_step")
    config = load_config(str(ROOT / "configs" / "quickstart.yaml"),
                         [f"output_dir={tmp_path}", "model.tiny.pretrain.corpus=none", "tracking.enabled=false"])
    _, backbone = tiny_backbone(config, load_tasks(config), cache_root=tmp_path / "_cache")
    built = backbone.config
    for key, value in bench.MODEL.items():
        if key.endswith("_pdrop"):  # pretraining runs without dropout (pretrain_lm's dropout=0)
            continue
        assert getattr(built, key) == value, key
