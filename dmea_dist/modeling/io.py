"""Saving and loading modules and paths (safetensors + a JSON manifest, never pickle).

Two artifact kinds share one layout, a directory holding `manifest.json` and
`modules.safetensors`:
- "pools": every module of every layer, all stored paths and `next_ids`; a
  full restore of a model's trainable state (`save_modules` / `load_modules`).
- "path": one task's path and only the modules on it, the per-task artifact
  that is enough to serve that task (`save_path_modules` / `load_path_modules`).

Tensor keys are `layers.{layer}.modules.{module_id}.{site}.{down|up}.{weight|bias}`.
The backbone is not in these files: it is the checkpoint the model was built
from, or the one `save_backbone` writes (with the plain GPT-2 key names).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dmea_dist.errors import DmeaError
from dmea_dist.modeling.adapters import LayerModule, RoutedSublayer
from dmea_dist.modeling.model import DMEAModel

FORMAT = "dmea-modules"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "modules.safetensors"


class ModuleFileError(DmeaError, ValueError):
    """A module artifact that is missing, malformed or does not fit the model."""


def save_modules(model: DMEAModel, directory: str | Path) -> Path:
    """Write every module and every stored path; returns the directory."""
    pools = {layer: model.module_ids(layer) for layer in range(model.n_layers)}
    manifest = _manifest(model, kind="pools", modules=pools)
    manifest.update(paths=model.paths, next_ids=list(model.next_ids))
    return _write(model, directory, manifest, pools)


def save_path_modules(model: DMEAModel, task_id: str, directory: str | Path) -> Path:
    """Write one task's path and only the modules on it; returns the directory."""
    path = model.path_of(task_id)
    modules = {layer: [module_id] for layer, module_id in enumerate(path)}
    manifest = _manifest(model, kind="path", modules=modules)
    manifest.update(task_id=task_id, path=path)
    return _write(model, directory, manifest, modules)


def load_modules(model: DMEAModel, directory: str | Path) -> None:
    """Replace all of `model`'s modules and paths by a "pools" artifact."""
    directory = Path(directory)
    manifest = _read_manifest(directory, kind="pools", model=model)
    state = _read_weights(directory, manifest, model)
    for task_id in model.paths:
        model.remove_path(task_id)
    model.drop_unused()  # no paths left: every module goes
    for layer in range(model.n_layers):
        for module_id, module_state in state[layer].items():
            model.put_module(layer, module_id, module_state)
    model.next_ids[:] = [
        max(model.next_ids[layer], int(n)) for layer, n in enumerate(manifest["next_ids"])
    ]
    for task_id, path in manifest["paths"].items():
        _set_path(model, directory, task_id, path)


def load_path_modules(model: DMEAModel, directory: str | Path) -> str:
    """Put one task's modules (overwriting same ids) and its path into `model`.

    Returns the task id. Other modules and paths of `model` are kept.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory, kind="path", model=model)
    state = _read_weights(directory, manifest, model)
    for layer in range(model.n_layers):
        for module_id, module_state in state[layer].items():
            model.put_module(layer, module_id, module_state)
    _set_path(model, directory, manifest["task_id"], manifest["path"])
    return manifest["task_id"]


def save_backbone(model: DMEAModel, directory: str | Path) -> Path:
    """`save_pretrained` of the backbone with plain GPT-2 key names.

    The routing wrappers put the original sublayers under `.base`; this strips
    that segment so `DMEAModel.from_pretrained(directory)` (or plain
    transformers) loads the frozen backbone, grown vocabulary included.
    """
    renames = {
        f"{name}.base.": f"{name}." for name, module in model.backbone.named_modules()
        if isinstance(module, RoutedSublayer)
    }
    state = {}
    for key, tensor in model.backbone.state_dict().items():
        for wrapped, plain in renames.items():
            if key.startswith(wrapped):
                key = plain + key[len(wrapped):]
                break
        state[key] = tensor
    model.backbone.save_pretrained(directory, state_dict=state)
    return Path(directory)


# ------------------------------------------------------------------- helpers


def _set_path(model: DMEAModel, directory: Path, task_id: str, path: list[int]) -> None:
    try:
        model.set_path(task_id, path)
    except ValueError as err:
        raise ModuleFileError(f"{directory / MANIFEST}: path of task {task_id!r}: {err}") from err


def _manifest(model: DMEAModel, *, kind: str, modules: dict[int, list[int]]) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "n_layer": model.n_layers,
        "d_model": model.d_model,
        "bottleneck": model.bottleneck,
        "modules": [modules[layer] for layer in range(model.n_layers)],
    }


def _write(model: DMEAModel, directory, manifest: dict, modules: dict[int, list[int]]) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, ids in modules.items():
        for module_id in ids:
            for name, tensor in model.get_module(layer, module_id).state_dict().items():
                key = f"layers.{layer}.modules.{module_id}.{name}"
                tensors[key] = tensor.detach().to("cpu").contiguous()
    save_file(tensors, str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def _read_manifest(directory: Path, *, kind: str, model: DMEAModel) -> dict:
    file = directory / MANIFEST
    if not file.is_file():
        raise ModuleFileError(f"{file}: not found; is {directory} a saved module directory?")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ModuleFileError(f"{file}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ModuleFileError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('format_version')!r}"
            f" is not {FORMAT!r} version {FORMAT_VERSION}"
        )
    if manifest.get("kind") != kind:
        other = "load_path_modules" if manifest.get("kind") == "path" else "load_modules"
        raise ModuleFileError(f"{file}: holds kind {manifest.get('kind')!r}; load it with {other}")
    for key, expected in (("n_layer", model.n_layers), ("d_model", model.d_model),
                          ("bottleneck", model.bottleneck)):
        if manifest.get(key) != expected:
            raise ModuleFileError(
                f"{file}: {key} is {manifest.get(key)!r} but the model has {expected}; build the "
                f"model on the same backbone shape (and bottleneck={manifest.get('bottleneck')})"
            )
    required = ["modules", *(("paths", "next_ids") if kind == "pools" else ("task_id", "path"))]
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ModuleFileError(f"{file}: missing keys {missing}; was it written by save_modules?")
    if len(manifest["modules"]) != model.n_layers:
        raise ModuleFileError(f"{file}: 'modules' must list the ids of {model.n_layers} layers")
    return manifest


def _read_weights(directory: Path, manifest: dict, model: DMEAModel) -> list[dict]:
    """Per layer, {module_id: state_dict} checked against the manifest and the model."""
    file = directory / WEIGHTS
    if not file.is_file():
        raise ModuleFileError(f"{file}: not found (the manifest lists modules stored there)")
    tensors = load_file(str(file), device="cpu")
    reference = LayerModule(model.d_model, model.bottleneck)
    expected_shapes = {k: v.shape for k, v in reference.state_dict().items()}
    state: list[dict[int, dict[str, torch.Tensor]]] = []
    for layer, ids in enumerate(manifest["modules"]):
        state.append({})
        for module_id in ids:
            prefix = f"layers.{layer}.modules.{module_id}."
            module_state = {}
            for name, shape in expected_shapes.items():
                tensor = tensors.pop(prefix + name, None)
                if tensor is None:
                    raise ModuleFileError(f"{file}: missing tensor {prefix + name}")
                if tensor.shape != shape:
                    raise ModuleFileError(
                        f"{file}: {prefix + name} has shape {tuple(tensor.shape)}, the model "
                        f"expects {tuple(shape)}; build the model on the same backbone shape"
                    )
                module_state[name] = tensor
            state[layer][int(module_id)] = module_state
    if tensors:
        raise ModuleFileError(f"{file}: tensors not listed in {MANIFEST}: {sorted(tensors)[:5]}")
    return state
