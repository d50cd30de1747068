# dmea-dist image. CPU by default; a CUDA PyTorch build with:
#   docker build --build-arg BASE=nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#                --build-arg TORCH_VERSION=2.13.0 -t dmea-dist:cuda .
# The index must hold that torch: 2.13 is built for CUDA 12.6, 13.0 and 13.2 (cu126, cu130, cu132; cu126 runs
# Maxwell to Hopper GPUs, cu130/cu132 Turing to Blackwell on R580+ drivers), cu124 stops at torch 2.6. The base:
# the same CUDA, and a Python the tested transformers installs on (5.25 needs >= 3.11: Ubuntu 24.04's 3.12; on
# 22.04's 3.10 pip quietly takes an older one).
# Everything goes into a virtualenv (/opt/venv): Ubuntu 24.04's own Python refuses pip installs (PEP 668).
# Run the quick start:   docker run --rm dmea-dist
# Cluster images: the same image on every Ray node (launch/README.md).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

# g++ and ninja: for DeepSpeed ops a GPU config may JIT-compile (CPU runs compile nothing). python3 for CUDA bases.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make python3 python3-pip python3-venv git \
 && rm -rf /var/lib/apt/lists/* \
 && (command -v python >/dev/null || ln -s /usr/bin/python3 /usr/local/bin/python) \
 && python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /opt/dmea-dist
# torch first, from the chosen index, so no dependency pulls another build
RUN python -m pip install "torch${TORCH_VERSION:+==${TORCH_VERSION}}" --index-url ${TORCH_INDEX} \
 && python -m pip install ninja
COPY pyproject.toml README.md ./
COPY dmea_dist ./dmea_dist
RUN python -m pip install .
COPY configs ./configs
COPY ray_jobs ./ray_jobs
COPY launch ./launch

# DS_ACCELERATOR=cpu keeps CPU runs on CPU even on GPU nodes; GPU training ranks (ray.use_gpu) set cuda
# for themselves (dmea_dist/distributed/cluster.py worker_env).
ENV DS_ACCELERATOR=cpu
CMD ["dmea", "run", "configs/quickstart.yaml"]
