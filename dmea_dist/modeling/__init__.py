"""GPT-2 with per-layer module pools, task paths and mixing coefficients."""

from dmea_dist.modeling.adapters import BottleneckAdapter, LayerModule, mixing_weights
from dmea_dist.modeling.io import (
    ModuleFileError,
    load_modules,
    load_path_modules,
    save_backbone,
    save_modules,
    save_path_modules,
)
from dmea_dist.modeling.model import BlockInputs, DMEAModel, grow_vocabulary

__all__ = [
    "BlockInputs", "BottleneckAdapter", "DMEAModel", "LayerModule", "ModuleFileError", "grow_vocabulary",
    "load_modules", "load_path_modules", "mixing_weights", "save_backbone", "save_modules", "save_path_modules",
]
