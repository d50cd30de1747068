"""What each method does at each stage: DMEA, its ablations, and the baselines.

All methods run on the same machinery (the same lifecycle, stages and engine);
a `MethodPolicy` only switches parts on and off:

| method    | modules                   | search init  | selection | replay          | scaling |
|-----------|---------------------------|--------------|-----------|-----------------|---------|
| dmea      | shared, searched          | similarity   | subspace  | shared modules  | yes     |
| acm       | shared, searched          | static logit | none      | shared modules  | no      |
| adapter   | one new module per task   | -            | none      | none            | no      |
| finetune  | none: full fine-tuning    | -            | none      | none            | no      |
| lamol     | none: full fine-tuning    | -            | none      | all earlier     | no      |
| multitask | one shared module         | -            | none      | - (joint data)  | no      |

DMEA's ablations come from the config (static init, random/no selection,
no gradient scaling), applied on top of the dmea row.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodPolicy:
    name: str
    search: bool  # architecture search from the second task on
    init: str  # "similarity" | "static" expansion logits
    selection: str  # "subspace" | "random" | "none"
    top_k: int
    replay: str  # "shared" | "all" | "none"
    transfer: bool  # selected tasks' pseudo samples through the new path
    scaling: bool  # dynamic gradient scaling
    full_finetune: bool  # train the whole backbone, no modules
    joint: bool  # multitask: one model trained on every task's real data at the end
    transfer_min_yield: float = 0.0  # transfer only from selected tasks whose pseudo samples yield this much
    # a selected task below transfer_min_yield gives its place to the next task in selection's order
    transfer_next: bool = False


def method_policy(name: str, *, init: str = "similarity", selection: str = "subspace", top_k: int = 2,
                  replay: str = "shared", transfer: bool = True, scaling: bool = True,
                  transfer_min_yield: float = 0.0, transfer_next: bool = False) -> MethodPolicy:
    """The policy of `name`; the keyword arguments (DMEA's options) apply to dmea only."""
    if name == "dmea":
        return MethodPolicy(name, True, init, selection, top_k, replay, transfer and selection != "none",
                            scaling, False, False, transfer_min_yield, transfer_next)
    if name == "acm":
        return MethodPolicy(name, True, "static", "none", 0, "shared", False, False, False, False)
    if name == "adapter":
        return MethodPolicy(name, False, "static", "none", 0, "none", False, False, False, False)
    if name == "finetune":
        return MethodPolicy(name, False, "static", "none", 0, "none", False, False, True, False)
    if name == "lamol":
        return MethodPolicy(name, False, "static", "none", 0, "all", False, False, True, False)
    if name == "multitask":
        return MethodPolicy(name, False, "static", "none", 0, "none", False, False, False, True)
    raise ValueError(f"method {name!r} unknown; choose dmea, acm, adapter, finetune, lamol or multitask")


def replay_tasks(*, policy: MethodPolicy, new_path: list[int] | None, paths: dict[str, list[int]],
                 earlier: list[str]) -> list[str]:
    """Earlier tasks replayed through their own paths while the new task trains."""
    if policy.replay == "none":
        return []
    if policy.replay == "all" or new_path is None:
        return list(earlier)
    return [t for t in earlier if any(a == b for a, b in zip(paths[t], new_path, strict=True))]
