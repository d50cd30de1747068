"""What `dmea run` does before Ray starts: check its input and name the coordinator's actor, without torch.

Every second there is serial: nothing else can start until Ray is up. torch and transformers' GPT-2
(imported by the tokenizer's AutoTokenizer, the Formatter, the Coordinator's modules) cost ~4 s of imports
there on 2 cores; the coordinator actor and the training ranks import them in their own processes. Nor does
recording a task need them (staging its files for the registry): the next stage waits for that record.
"""

from __future__ import annotations

import subprocess
import sys

import yaml

from dmea_dist.config import load_config
from dmea_dist.preflight import check_input

DRIVER = """
import sys

from dmea_dist import cli  # noqa: F401 - what `dmea run` imports, in its order
from dmea_dist.config import load_config
from dmea_dist.driver import run_sequence  # noqa: F401
from dmea_dist.preflight import check_input
from dmea_dist.distributed.cluster import logical_cpus, ray_dashboard_url, sized_for  # noqa: F401
from dmea_dist.distributed.coordinator import connect, launch_ranks, ray_coordinator_factory  # noqa: F401

check_input(load_config(sys.argv[1]))
from dmea_dist.serving import stage_task  # noqa: F401 - what recording a task needs, between two stages
from dmea_dist.tracking import Tracker  # noqa: F401
print(" ".join(m for m in ("torch", "transformers.models.gpt2.modeling_gpt2", "deepspeed", "dmea_dist.coordinator",
                           "dmea_dist.kernels") if m in sys.modules))
"""


def test_the_driver_checks_input_names_the_coordinator_and_records_without_torch_or_the_model(tmp_path):
    tiny = {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 64, "vocab_size": 300,
            "pretrain": {"steps": 20, "batch_size": 4, "seq_len": 32, "heldout_tasks": 1}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "runs"), "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db"},
        "data": {"tasks": ["synth.hotel.00", "synth.listops.00"], "synth_sizes": [16, 8, 8], "overlength": "truncate"},
        "model": {"tiny": tiny, "max_length": 64}}))
    check_input(load_config(path))  # a first run pretrains the backbone (torch): the second finds it cached

    out = subprocess.run([sys.executable, "-c", DRIVER, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the driver imported: {out.stdout.strip()}"
