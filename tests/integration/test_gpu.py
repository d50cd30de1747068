"""GPU checks (skipped without CUDA): the module pools, generation, bf16 autocast and DeepSpeed on the device.

DeepSpeed's accelerator is fixed per process and the suite forces the CPU one,
so the adaptation check runs its GPU side in a child process
(tests/integration/adapt_case.py) and compares it with the same job here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dmea_dist.data.formatting import IGNORE
from dmea_dist.method.training import task_loss
from dmea_dist.modeling.model import DMEAModel
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.gpu


@pytest.fixture
def models(tiny_gpt2_config):
    cpu = DMEAModel.from_config(tiny_gpt2_config, seed=0).eval()
    path = cpu.add_modules(generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in cpu.trainable_parameters(path):
            p.add_(0.05 * torch.randn_like(p))
    gpu = DMEAModel.from_config(tiny_gpt2_config, seed=0)
    gpu.add_modules()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda().eval(), path


def test_path_forward_matches_cpu(models):
    cpu, gpu, path = models
    ids = torch.randint(0, 90, (4, 16))
    expected = cpu(ids, path=path).logits
    got = gpu(ids.cuda(), path=path).logits.cpu()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_generation_on_gpu_follows_the_path(models):
    cpu, gpu, path = models
    prompt = torch.randint(0, 90, (2, 4))
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8, pad_token_id=95,
                  eos_token_id=95)
    expected = cpu.generate(prompt, path=path, **kwargs)
    got = gpu.generate(prompt.cuda(), path=path, **{**kwargs, "attention_mask": kwargs["attention_mask"].cuda()})
    assert torch.equal(got.cpu(), expected)


def test_bf16_autocast_loss_is_close_to_fp32(models):
    _, gpu, path = models
    ids = torch.randint(0, 90, (4, 16), device="cuda")
    labels = ids.clone()
    labels[:, :4] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    full = task_loss(gpu, batch, batch, path=path, lm_lambda=0.25)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half = task_loss(gpu, batch, batch, path=path, lm_lambda=0.25).float()
    assert abs(float(full) - float(half)) < 0.05 * float(full)


@pytest.mark.integration
def test_adaptation_on_gpu_trains_what_the_cpu_trains_at_every_zero_stage(tmp_path):
    """The scaled DeepSpeed step on CUDA (NCCL, ZeRO 1/2/3) against the same job on the CPU (gloo)."""
    from tests.integration.adapt_case import adapt_tiny

    out = tmp_path / "gpu.pt"
    path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "DS_ACCELERATOR": "cuda", "PYTHONPATH": path}
    subprocess.run([sys.executable, "-m", "tests.integration.adapt_case", str(out)], cwd=REPO_ROOT, env=env,
                   check=True, timeout=600)
    on_gpu = torch.load(out)
    for stage in (1, 2, 3):
        gpu, cpu = on_gpu[stage], adapt_tiny(stage, "cpu")
        assert gpu["device"].startswith("cuda")
        assert gpu["modules"].keys() == cpu["modules"].keys()
        etas = cpu["etas"]["replay:a"]
        assert len(etas) == 4 and all(0.1 < e < 10.0 for e in etas)  # scaled, off the clamp
        assert gpu["etas"]["replay:a"] == pytest.approx(etas, rel=1e-3)
        for key in ("new", "transfer:a", "replay:a"):
            assert gpu["losses"][key] == pytest.approx(cpu["losses"][key], rel=1e-4)
        for key, expected in cpu["modules"].items():
            torch.testing.assert_close(gpu["modules"][key], expected, atol=2e-4, rtol=1e-3)


def test_an_in_process_run_on_a_gpu_machine_finishes(tmp_path):
    """`dmea run --in-process` where DeepSpeed finds CUDA: ZeRO 1/2 move the model they train onto the GPU, and
    the stages after adaptation (evaluation, search, generation) build their batches on the CPU."""
    import yaml

    from tests.integration.tiny_run import tiny_config

    config = tiny_config(tmp_path, data={"tasks": ["synth.hotel.00", "synth.hotel.01"], "synth_sizes": [32, 12, 12]},
                         tracking={"enabled": False})
    path = tmp_path / "gpu_run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    env = {**os.environ, "DS_ACCELERATOR": "cuda",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)}
    done = subprocess.run([sys.executable, "-m", "dmea_dist.cli", "run", str(path), "--in-process",
                           "--run-dir", str(tmp_path / "run")], cwd=REPO_ROOT, env=env, timeout=900,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
