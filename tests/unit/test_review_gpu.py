"""Review of the GPU path, on a machine without one: each test shows one bug, fixed, with fakes at the
torch.cuda boundary (what a process on a GPU node sees) instead of a GPU."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.unit.test_adapt_checkpoint_ranks import (
    _SGDEngine,  # plain SGD; checkpoints hold the parameters
    tiny_job,
)


def test_a_cpu_training_rank_on_a_gpu_node_creates_no_cuda_context(tmp_path, tiny_gpt2_config, monkeypatch):
    """Ray leaves a node's GPUs visible to actors that reserve none, so a CPU training rank (`ray.use_gpu`
    off, DS_ACCELERATOR=cpu) on a GPU node sees `torch.cuda.is_available()`. The adaptation forked the RNG of
    every visible GPU (`fork_rng()`) and its checkpoints read the CUDA generator: each creates a CUDA context
    on the GPUs (memory beside the GPU ranks'; an error where they are in exclusive-process mode) for
    generators CPU training never draws from. Now CUDA is touched only where it is in use."""
    from dmea_dist.method.adaptation import run_adapt_job

    def touched(*args, **kwargs):
        raise AssertionError("a CPU rank touched CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all", "init", "current_device"):
        monkeypatch.setattr(torch.cuda, name, touched)
    model, job = tiny_job(tiny_gpt2_config)

    def factory(target, params):
        return _SGDEngine(target, params)

    def stop_at_3(done, total, **info):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a checkpoint at step 2 is saved, then the job stops
        run_adapt_job(copy.deepcopy(model), job, engine_factory=factory, checkpoint_dir=tmp_path, on_step=stop_at_3)
    resumed = run_adapt_job(copy.deepcopy(model), job, engine_factory=factory, checkpoint_dir=tmp_path)
    assert resumed.resumed_from == 2


def test_a_gpu_rank_gets_its_cuda_generator_back_after_a_job(tiny_gpt2_config, monkeypatch):
    """Where CUDA is in use (a GPU rank after its first job), the job still forks the CUDA generator: the
    state before the job is the state after it, as for the CPU one. Only the device it trains on: forking
    every visible one (an in-process run on a machine of 2 GPUs) created a context on each."""
    from dmea_dist.method.adaptation import run_adapt_job

    model, job = tiny_job(tiny_gpt2_config)
    state = {0: torch.tensor([1, 2, 3], dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def get_rng_state(device="cuda"):
        assert device in ("cuda", 0), f"GPU {device}, which the job does not train on, was touched"
        return state[0].clone()

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": state.__setitem__(0, s.clone()))

    def seed_all(seed):  # what torch.manual_seed does to the CUDA generators
        state[0] = torch.tensor([seed % 256] * 3, dtype=torch.uint8)

    monkeypatch.setattr(torch.cuda, "manual_seed_all", seed_all)
    seen = []

    def on_step(done, total, **info):
        seen.append(state[0].tolist())

    run_adapt_job(model, job, engine_factory=lambda target, params: _SGDEngine(target, params), on_step=on_step)
    assert seen[0] == [0, 0, 0]  # seeded by the job (seed 0, rank 0) while it runs
    assert state[0].tolist() == [1, 2, 3]


def _ray_kernels_of(monkeypatch, **ray_section):
    """`ray_kernels` of a run with this `ray:` section, its RayKernels a stub (no actors)."""
    from types import SimpleNamespace

    from dmea_dist.config import config_from_dict
    from dmea_dist.distributed import kernels as kernels_module

    class Kernels:
        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(kernels_module, "RayKernels", Kernels)
    monkeypatch.setattr(kernels_module.ray, "is_initialized", lambda: True)
    config = config_from_dict({"data": {"tasks": ["synth.restaurant.00"]}, "ray": {"warm_up": False, **ray_section}})
    run = SimpleNamespace(config=config, tokenizer=None, formatter=SimpleNamespace(max_length=64), run_dir="/nowhere",
                          policy=SimpleNamespace(full_finetune=False), model=None)
    return kernels_module.ray_kernels(run)


@pytest.mark.parametrize(("use_gpu", "adapt_on", "driver", "expected"), [
    (True, "coordinator", "cpu", "cuda"),  # the project's image and the Makefile set cpu for the driver
    (False, "coordinator", "cuda", "cpu"),
    (True, "train_group", "cpu", "cpu"),  # the coordinator trains nothing; the ranks say cuda (worker_env)
])
def test_adaptation_in_the_coordinator_runs_where_use_gpu_says(monkeypatch, use_gpu, adapt_on, driver, expected):
    """`ray.adapt_on: coordinator` runs DeepSpeed in the coordinator's process, whose DS_ACCELERATOR was the
    driver's: `cpu` on the project's image, so `use_gpu` trained on the CPU without a word (the bug
    worker_env fixed for the training ranks), and a driver's `cuda` put a CPU run on a GPU. The coordinator
    now says its accelerator outright, from the config."""
    import os

    monkeypatch.setenv("DS_ACCELERATOR", driver)  # undone after the test, as what ray_kernels sets
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the coordinator's node has a GPU
    _ray_kernels_of(monkeypatch, use_gpu=use_gpu, adapt_on=adapt_on)
    assert os.environ["DS_ACCELERATOR"] == expected


def test_gpu_adaptation_in_a_coordinator_without_a_gpu_is_refused_in_one_line(monkeypatch):
    """Forced onto CUDA where the coordinator's node has none (the head of launch/cluster-gpu.yaml), DeepSpeed
    would fail at the first adaptation, after the first task's search; the kernels refuse it when built."""
    from dmea_dist.errors import ConfigError

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="adapt_on: train_group"):
        _ray_kernels_of(monkeypatch, use_gpu=True, adapt_on="coordinator")


# Facts of PyTorch's wheel indexes and of the bases, for the CUDA image's recipe (checked 2026; no Docker daemon
# and no route to download.pytorch.org here, so the image was not built):
# - the CUDA builds of each torch release (pytorch/pytorch RELEASE.md, "PyTorch CUDA Support Matrix": CUDA 12.6.3,
#   13.0.2 and 13.2.1 for releases 2.12 to 2.14, pytorch/pytorch#197555); cu124 has no torch after 2.6
#   (pytorch/pytorch#155790) and cu128 none for 2.13;
# - the Python each Ubuntu release ships (its python3 package).
TORCH_CUDA_BUILDS = {"2.12": {"cu126", "cu130", "cu132"}, "2.13": {"cu126", "cu130", "cu132"},
                     "2.14": {"cu126", "cu130", "cu132"}}
UBUNTU_PYTHON = {"20.04": "3.8", "22.04": "3.10", "24.04": "3.12"}


def test_the_cuda_image_recipe_installs_the_tested_stack():
    """The Dockerfile's CUDA recipe named the cu124 index, which holds no torch after 2.6 (the tested one is
    2.13: a pinned build failed, an unpinned one got torch 2.6), on Ubuntu 22.04, whose Python 3.10 the
    tested transformers (5.25: >= 3.11) does not install on. It now names an index that holds the Makefile's
    torch, a base of the same CUDA, a Python the installed stack accepts, and a virtualenv (Ubuntu 24.04's
    Python refuses pip, PEP 668)."""
    import re
    from importlib.metadata import metadata

    from packaging.specifiers import SpecifierSet

    from tests.conftest import REPO_ROOT

    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    recipe = " ".join(line.lstrip("# ").rstrip(" \\") for line in dockerfile.splitlines()
                      if line.startswith("#") and "--build-arg" in line)
    args = dict(re.findall(r"--build-arg (\w+)=(\S+)", recipe))
    tested = re.search(r"^TORCH_VERSION \?= (\S+)", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert args.get("TORCH_VERSION") == tested, f"the recipe pins torch {args.get('TORCH_VERSION')}, not {tested}"
    index = args["TORCH_INDEX"].rstrip("/").rsplit("/", 1)[1]
    assert index in TORCH_CUDA_BUILDS[tested.rsplit(".", 1)[0]], f"{index} holds no torch {tested}"
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-\S*-ubuntu(\d+\.\d+)", args["BASE"])
    assert base, args["BASE"]
    assert f"cu{base[1]}{base[2]}" == index, f"base CUDA {base[1]}.{base[2]} with the {index} index"
    python = UBUNTU_PYTHON[base[3]]
    for package in ("torch", "transformers", "ray", "deepspeed"):
        needs = metadata(package).get("Requires-Python") or ""
        assert python in SpecifierSet(needs), f"{package} needs Python {needs}; ubuntu{base[3]} has {python}"
    assert "-m venv /opt/venv" in dockerfile and "ENV PATH=/opt/venv/bin:$PATH" in dockerfile
