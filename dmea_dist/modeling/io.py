"""Saving and loading modules and paths (safetensors + a JSON manifest, never pickle).

Two artifact kinds share one layout, a directory holding `manifest.json` and
`modules.safetensors`:
- "pools": every module of every layer, all stored paths and `next_ids`; a
  full restore of a model's trainable state (`save_modules` / `load_modules`).
- "path": one task's path and only the modules on it, the per-task artifact
  that is enough to serve that task (`save_path_modules` / `load_path_modules`).

Tensor keys are `layers.{layer}.modules.{module_id}.{site}.{down|up}.{weight|bias}`,
the one key scheme of module weights wherever they travel: these files, the
model snapshots generation actors receive, adaptation checkpoints, search
results (`modules_state` / `put_modules_state`). A task's token rows
(`DMEAModel.claim_token_rows`) travel beside them as `rows.{task_id}.ids`
and `rows.{task_id}.weight`; both artifact kinds hold every task's rows (a
task's answers use rows of tokens an earlier task claimed), listed in the
manifest's `rows` (absent in files written before rows existed: none).
The backbone is not in these files: it is the checkpoint the model was built
from, or the one `save_backbone` writes (with the plain GPT-2 key names).

Damaged files fail as `ModuleFileError` naming the file and what to do, never
as a traceback or, worse, as a model that loads and answers wrongly:
- the manifest records `weights_sha256`, the SHA-256 of `modules.safetensors`,
  checked at load: a flipped bit in a float loads fine and only gives empty
  answers. Manifests written before it existed load without the check;
- a truncated or foreign weights file (safetensors cannot parse it) and a
  manifest of another format or model shape are named as such;
- both files are written atomically and durably (`dmea_dist.files`), weights
  first, manifest last, so a killed save or a machine crash never leaves a
  manifest over half a file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dmea_dist.errors import DmeaError
from dmea_dist.files import atomic_path, sync_tree, write_text
from dmea_dist.modeling.adapters import LayerModule, RoutedSublayer
from dmea_dist.modeling.model import DMEAModel

FORMAT = "dmea-modules"
FORMAT_VERSION = 2  # 2: token rows (`rows`); files without rows are still written as version 1
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "modules.safetensors"


class ModuleFileError(DmeaError, ValueError):
    """A module artifact that is missing, malformed or does not fit the model."""


# what to do about a damaged module file, in every error that finds one
_RESTORE = ("restore the folder from the task's MLflow run (artifacts under modules/) or a backup, "
            "or train the task again")


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
    state, rows = _read_weights(directory, manifest, model)
    for task_id in model.paths:
        model.remove_path(task_id)
    model.drop_unused()  # no paths left: every module goes
    model.clear_token_rows()
    _put_rows(model, rows)
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
    return put_path_modules(model, read_path_modules(model, directory))


@dataclass
class PathModules:
    """One task's "path" artifact, read and checked against a model (`read_path_modules`)."""

    directory: Path
    task_id: str
    path: list[int]
    modules: list[dict[int, dict[str, torch.Tensor]]]  # per layer {module_id: state_dict}
    rows: dict[str, dict[str, torch.Tensor]]  # {task_id: {"ids", "weight"}}: every task's rows at save time


def read_path_modules(model: DMEAModel, directory: str | Path) -> PathModules:
    """Read one task's modules, rows and path, checked as `load_path_modules` does, without loading them."""
    directory = Path(directory)
    manifest = _read_manifest(directory, kind="path", model=model)
    state, rows = _read_weights(directory, manifest, model)
    return PathModules(directory, manifest["task_id"], manifest["path"], state, rows)


def put_path_modules(model: DMEAModel, loaded: PathModules) -> str:
    """Put what `read_path_modules` read into `model` (`load_path_modules`'s second half); returns the task id."""
    for layer in range(model.n_layers):
        for module_id, module_state in loaded.modules[layer].items():
            model.put_module(layer, module_id, module_state)
    _put_rows(model, loaded.rows)
    _set_path(model, loaded.directory, loaded.task_id, loaded.path)
    return loaded.task_id


def module_key(layer: int, module_id: int, name: str) -> str:
    """The key of one tensor of one module (`name`: e.g. attn.down.weight)."""
    return f"layers.{layer}.modules.{module_id}.{name}"


def modules_state(model: DMEAModel, modules: dict[int, list[int]] | None = None, *,
                  rows: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{key: detached CPU tensor} of `modules` ({layer: [module ids]}) and of the token rows of the tasks
    `rows`; default: every module and every task's rows."""
    if modules is None:
        modules = {layer: model.module_ids(layer) for layer in range(model.n_layers)}
        rows = list(model.token_rows.owners) if rows is None else rows
    state = {module_key(layer, module_id, name): tensor.detach().to("cpu").contiguous()
             for layer, ids in modules.items() for module_id in ids
             for name, tensor in model.get_module(layer, module_id).state_dict().items()}
    for task_id in rows or []:
        for param in model.token_rows_parameters(task_id):
            state[f"rows.{task_id}.ids"] = torch.tensor(model.token_rows.ids_of(task_id), dtype=torch.long)
            state[f"rows.{task_id}.weight"] = param.detach().to("cpu").contiguous()
    return state


def split_rows(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(module tensors, {task_id: {"ids": ..., "weight": ...}}) of a `modules_state` dict."""
    modules, rows = {}, {}
    for key, tensor in tensors.items():
        if key.startswith("rows."):
            task_id, name = key[len("rows."):].rsplit(".", 1)
            rows.setdefault(task_id, {})[name] = tensor
        else:
            modules[key] = tensor
    return modules, rows


def put_modules_state(model: DMEAModel, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Create or overwrite every module and token-row table `tensors` holds; returns the modules' (layer, id)."""
    tensors, rows = split_rows(tensors)
    grouped: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        _, layer, _, module_id, name = key.split(".", 4)
        grouped.setdefault((int(layer), int(module_id)), {})[name] = tensor
    for (layer, module_id), state in grouped.items():
        model.put_module(layer, module_id, state)
    _put_rows(model, rows)
    return sorted(grouped)


def _put_rows(model: DMEAModel, rows: dict[str, dict]) -> None:
    for task_id, table in rows.items():
        model.put_token_rows(task_id, table["ids"], table["weight"])


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
    return sync_tree(directory)  # durable before the run's state or a record names it


# ------------------------------------------------------------------- helpers


def _set_path(model: DMEAModel, directory: Path, task_id: str, path: list[int]) -> None:
    try:
        model.set_path(task_id, path)
    except ValueError as err:
        raise ModuleFileError(f"{directory / MANIFEST}: path of task {task_id!r}: {err}") from err


def _manifest(model: DMEAModel, *, kind: str, modules: dict[int, list[int]]) -> dict:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if model.token_rows.owners else 1,
        "kind": kind,
        "n_layer": model.n_layers,
        "d_model": model.d_model,
        "bottleneck": model.bottleneck,
        "modules": [modules[layer] for layer in range(model.n_layers)],
        "rows": list(model.token_rows.owners),
    }


def _write(model: DMEAModel, directory, manifest: dict, modules: dict[int, list[int]]) -> Path:
    directory = Path(directory)
    tensors = modules_state(model, modules, rows=manifest["rows"])
    with atomic_path(directory / WEIGHTS) as partial:  # weights first: the manifest names their checksum
        save_file(tensors, str(partial), metadata={"format": "pt"})
        manifest["weights_sha256"] = _sha256(partial)
    write_text(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return directory


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(directory: Path, *, kind: str, model: DMEAModel) -> dict:
    file = directory / MANIFEST
    if not file.is_file():
        raise ModuleFileError(f"{file}: not found; is {directory} a saved module directory?")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModuleFileError(f"{file}: not a dmea module manifest (not valid JSON: {err}); {_RESTORE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModuleFileError(f"{file}: not a dmea module manifest (format {found!r}, expected {FORMAT!r}); "
                              f"point at a task's modules/ folder (run_dir/tasks/NNN-<task>/modules)")
    if manifest.get("format_version") not in READABLE_VERSIONS:
        raise ModuleFileError(f"{file}: {FORMAT} version {manifest.get('format_version')!r}, this dmea-dist "
                              f"reads version {FORMAT_VERSION}; load it with the dmea-dist that wrote it")
    if manifest.get("kind") != kind:
        other = "load_path_modules" if manifest.get("kind") == "path" else "load_modules"
        raise ModuleFileError(f"{file}: holds kind {manifest.get('kind')!r}; load it with {other}")
    for key, expected in (("n_layer", model.n_layers), ("d_model", model.d_model),
                          ("bottleneck", model.bottleneck)):
        if manifest.get(key) != expected:
            saved = ", ".join(f"{k}={manifest.get(k)}" for k in ("n_layer", "d_model", "bottleneck"))
            raise ModuleFileError(
                f"{file}: {key} is {manifest.get(key)!r} but the model has {expected}: these modules were "
                f"saved for a model with {saved}; load them into a model of that shape (the backbone and "
                f"model.bottleneck of the run that saved them)"
            )
    required = ["modules", *(("paths", "next_ids") if kind == "pools" else ("task_id", "path"))]
    missing = [key for key in required if key not in manifest]
    if missing:
        raise ModuleFileError(f"{file}: missing keys {missing}; was it written by save_modules?")
    if len(manifest["modules"]) != model.n_layers:
        raise ModuleFileError(f"{file}: 'modules' must list the ids of {model.n_layers} layers")
    return manifest


def _read_weights(directory: Path, manifest: dict, model: DMEAModel) -> tuple[list[dict], dict[str, dict]]:
    """(per layer {module_id: state_dict}, {task_id: token rows}) checked against the manifest and the model."""
    file = directory / WEIGHTS
    if not file.is_file():
        raise ModuleFileError(f"{file}: not found (the manifest lists modules stored there); {_RESTORE}")
    expected_sha = manifest.get("weights_sha256")  # absent in manifests written before it was recorded
    if expected_sha is not None and _sha256(file) != expected_sha:
        raise ModuleFileError(f"{file}: damaged, its SHA-256 differs from the one its {MANIFEST} recorded at "
                              f"save time (the file changed after it was written); {_RESTORE}")
    try:
        tensors = load_file(str(file), device="cpu")
    except (SafetensorError, OSError) as err:
        raise ModuleFileError(f"{file}: not a readable safetensors file ({err}): truncated, damaged or "
                              f"another kind of file; {_RESTORE}") from None
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
    rows = {}
    for task_id in manifest.get("rows", []):
        ids, weight = tensors.pop(f"rows.{task_id}.ids", None), tensors.pop(f"rows.{task_id}.weight", None)
        if ids is None or weight is None:
            raise ModuleFileError(f"{file}: missing the token rows of task {task_id!r} its {MANIFEST} lists; "
                                  f"{_RESTORE}")
        if ids.dim() != 1 or weight.shape != (len(ids), model.d_model):
            raise ModuleFileError(f"{file}: the token rows of task {task_id!r} have shapes {tuple(ids.shape)} "
                                  f"and {tuple(weight.shape)}, the model expects (n,) and (n, {model.d_model})")
        rows[task_id] = {"ids": ids, "weight": weight}
    if tensors:
        raise ModuleFileError(f"{file}: tensors not listed in {MANIFEST}: {sorted(tensors)[:5]}")
    return state, rows
