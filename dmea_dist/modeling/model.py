"""`DMEAModel`: a frozen GPT-2 with a pool of modules in every layer, and paths.

Key decisions:
- The backbone (embeddings and LM head included) is frozen on construction;
  all trainable capacity lives in `self.pools` (one `nn.ModuleDict` per layer,
  str(module_id) -> `LayerModule`).
- Routing is a context (`route(path)`, `mixing(candidates, logits)`) that sets
  the per-layer routers for the duration of the block and restores the
  previous state on exit, so `backbone.generate` inside `route` runs along the
  path with the KV cache, and contexts nest. `route_batch(paths)` routes
  each row of a batch along its own path (several tasks in one batch, for
  serving and evaluation across tasks); a batch of one task costs what
  `route` costs.
- Module ids are per layer and never reused within a model (`next_ids` is
  saved with the modules), so a path stays unambiguous across the whole run.
- Token rows (`claim_token_rows`): the backbone's embedding rows of tokens it
  never saw (`backbone.config.dmea_untrained_tokens`: words only the run's
  text uses, added special tokens) can be given to the first task whose data
  uses them, as a small trainable table beside the frozen embedding. The
  table overrides those rows in the input embedding and in the tied LM head,
  and a task's rows train only in its own adaptation, so a later task never
  moves them (as a module that nobody reuses). A forward sees the rows of the
  tasks in its scope (`scope=` / `scopes=`, `only_rows_of`; default every
  task's): an earlier task's samples run in the scope of the tasks up to it,
  so a later task's trained rows cannot compete in its softmax through the
  tied head, whatever the route (the token-row leak, RESULTS 0d).
- Dropout and attention: the backbone's dropout and SDPA attention are
  swapped for `dropout.py`'s, which compute the same function with a cheaper
  dropout mask in CPU training (40% of a tiny model's step was torch's
  dropout); evaluation, generation and GPU tensors run torch's own.
- Reserved special tokens: `from_pretrained(vocab_size=...)` grows the
  embeddings once, before freezing, with *distinct* seeded rows.
  transformers' default "mean resizing" samples new rows with covariance
  scaled by 1e-9, i.e. practically identical rows: with a frozen, tied LM head
  the model could then never tell the answer separator from a task's
  generation token.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from dmea_dist.modeling.adapters import LayerModule, LayerRouter, RoutedSublayer
from dmea_dist.modeling.dropout import use_cpu_dropout
from dmea_dist.offline import OFFLINE


@dataclass
class BlockInputs:
    """What `capture_block_inputs` recorded: per layer, the latest block input."""

    layers: list[torch.Tensor | None] = field(default_factory=list)  # (batch, seq, d_model)


class DMEAModel(nn.Module):
    """A frozen GPT-2 whose blocks run along a path through per-layer module pools."""

    def __init__(self, backbone: GPT2LMHeadModel, *, bottleneck: int | None = None) -> None:
        super().__init__()
        if not isinstance(backbone, GPT2LMHeadModel):
            raise TypeError(f"backbone must be a GPT2LMHeadModel, got {type(backbone).__name__}")
        self.backbone = backbone
        self.backbone.requires_grad_(False)
        use_cpu_dropout(backbone)  # dropout at a third of torch's cost in CPU training (dropout.py)
        self.d_model = int(backbone.config.n_embd)
        self.n_layers = int(backbone.config.n_layer)
        self.bottleneck = int(bottleneck) if bottleneck is not None else max(1, self.d_model // 16)
        if self.bottleneck < 1:
            raise ValueError(f"bottleneck must be >= 1, got {bottleneck}")
        self.pools = nn.ModuleList(nn.ModuleDict() for _ in range(self.n_layers))
        self.next_ids = [0] * self.n_layers
        self._paths: dict[str, list[int]] = {}
        self._routers = [LayerRouter(pool) for pool in self.pools]
        self.token_rows = TokenTable()
        self._row_lookup: torch.Tensor | None = None  # (vocab,) index into the table's rows, -1: none
        self._row_owner: torch.Tensor | None = None  # (rows,) which TaskRows entry each row of the table is
        # the tasks whose rows the forwards see: None every task's, a set, or one (set or None) per batch row
        self._scope: frozenset[str] | list[frozenset[str] | None] | None = None
        self._scope_mask: tuple | None = None  # (scope, lookup) it was computed for, and the mask
        backbone.get_input_embeddings().register_forward_hook(self._embed_with_rows)
        head = backbone.get_output_embeddings()
        if head is not None:
            head.register_forward_hook(self._head_with_rows)
        for block, router in zip(self.blocks, self._routers, strict=True):
            if isinstance(block.attn, RoutedSublayer):
                raise ValueError("this backbone is already wrapped by another DMEAModel")
            block.attn = RoutedSublayer(block.attn, router, "attn")
            block.mlp = RoutedSublayer(block.mlp, router, "mlp")

    # ----------------------------------------------------------------- building

    @classmethod
    def from_config(
        cls, config: GPT2Config, *, bottleneck: int | None = None, seed: int = 0
    ) -> DMEAModel:
        """A randomly initialised backbone, deterministic in `seed` (the offline default)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = GPT2LMHeadModel(config)
        return cls(backbone, bottleneck=bottleneck)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        vocab_size: int | None = None,
        bottleneck: int | None = None,
        seed: int = 0,
    ) -> DMEAModel:
        """Load a GPT-2 checkpoint; grow its vocabulary to `vocab_size` (once, here)."""
        backbone = GPT2LMHeadModel.from_pretrained(name_or_path, **OFFLINE)
        if vocab_size is not None:
            grow_vocabulary(backbone, vocab_size=vocab_size, seed=seed)
        return cls(backbone, bottleneck=bottleneck)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.backbone.transformer.h

    def _new_module(self) -> LayerModule:
        reference = self.backbone.transformer.wte.weight
        module = LayerModule(self.d_model, self.bottleneck)
        return module.to(device=reference.device, dtype=reference.dtype)

    # ------------------------------------------------------------------ modules

    def add_modules(self, *, layers: list[int] | None = None, generator=None) -> list[int]:
        """Add one fresh (identity) module to every layer, or to `layers`.

        Returns the new module id of each layer added to, in the order of
        `layers` (for `layers=None`, a full path of the new modules).
        `generator` seeds the `down` projections. (Not `add_module`: that is
        nn.Module's registration of a submodule, which torch itself calls.)
        """
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        for layer in layers:
            self._check_layer(layer)
        if len(set(layers)) != len(layers):
            raise ValueError(f"add_module: layers has duplicates: {layers}")
        new_ids = []
        for layer in layers:
            module = self._new_module()
            if generator is not None:
                module.reset_parameters(generator)
            new_ids.append(self.next_ids[layer])
            self.pools[layer][str(self.next_ids[layer])] = module
            self.next_ids[layer] += 1
        return new_ids

    def put_module(self, layer: int, module_id: int, state_dict: dict[str, torch.Tensor]) -> None:
        """Create (or overwrite) module `module_id` of `layer` with the given weights."""
        self._check_layer(layer)
        if not isinstance(module_id, int) or module_id < 0:
            raise ValueError(f"module_id must be an int >= 0, got {module_id!r}")
        module = self._new_module()
        module.load_state_dict(state_dict)  # strict: names and shapes must match
        self.pools[layer][str(module_id)] = module
        self.next_ids[layer] = max(self.next_ids[layer], module_id + 1)

    def get_module(self, layer: int, module_id: int) -> LayerModule:
        self._check_module(layer, module_id)
        return self.pools[layer][str(module_id)]

    def pool_sizes(self) -> list[int]:
        return [len(pool) for pool in self.pools]

    def module_ids(self, layer: int) -> list[int]:
        self._check_layer(layer)
        return sorted(int(key) for key in self.pools[layer].keys())

    def drop_modules(self, layer: int, ids: list[int]) -> None:
        """Remove modules from a layer; refuses modules a stored path uses."""
        for module_id in ids:
            self._check_module(layer, module_id)
            users = [t for t, p in self._paths.items() if p[layer] == module_id]
            if users:
                raise ValueError(
                    f"cannot drop module {module_id} of layer {layer}: the paths of tasks "
                    f"{users} use it (drop those paths first)"
                )
        for module_id in ids:
            del self.pools[layer][str(module_id)]

    def drop_unused(self) -> int:
        """Remove every module no stored path uses; returns how many were removed."""
        dropped = 0
        for layer in range(self.n_layers):
            used = {path[layer] for path in self._paths.values()}
            unused = [m for m in self.module_ids(layer) if m not in used]
            self.drop_modules(layer, unused)
            dropped += len(unused)
        return dropped

    # -------------------------------------------------------------------- paths

    def set_path(self, task_id: str, path: list[int]) -> None:
        if not isinstance(task_id, str) or not task_id:
            raise ValueError(f"task_id must be a non-empty string, got {task_id!r}")
        self._paths[task_id] = self._checked_path(path)

    def path_of(self, task_id: str) -> list[int]:
        if task_id not in self._paths:
            raise ValueError(f"no path stored for task {task_id!r}; known tasks: {sorted(self._paths)}")
        return list(self._paths[task_id])

    def remove_path(self, task_id: str) -> None:
        self.path_of(task_id)  # raises for an unknown task
        del self._paths[task_id]

    @property
    def paths(self) -> dict[str, list[int]]:
        return {task_id: list(path) for task_id, path in self._paths.items()}

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an int in [0, {self.n_layers}), got {layer!r}")

    def _check_module(self, layer: int, module_id: int) -> None:
        self._check_layer(layer)
        if str(module_id) not in self.pools[layer] or isinstance(module_id, bool):
            raise ValueError(
                f"layer {layer} has no module {module_id!r} (its modules: {self.module_ids(layer)})"
            )

    def _checked_path(self, path: list[int]) -> list[int]:
        path = list(path)
        if len(path) != self.n_layers:
            raise ValueError(
                f"a path needs one module id per layer ({self.n_layers}), got {len(path)}: {path}"
            )
        for layer, module_id in enumerate(path):
            if not isinstance(module_id, int):
                raise ValueError(f"path[{layer}] must be an int module id, got {module_id!r}")
            self._check_module(layer, module_id)
        return path

    # --------------------------------------------------------------- token rows

    @property
    def untrained_tokens(self) -> list[int]:
        """Tokens whose embedding rows the backbone never trained (recorded where it was built)."""
        return [int(t) for t in getattr(self.backbone.config, "dmea_untrained_tokens", None) or []]

    def claim_token_rows(self, task_id: str, tokens) -> list[int]:
        """Give `task_id` trainable rows for those of `tokens` that are untrained and that no task owns yet.

        Idempotent: a task that holds rows keeps them (a re-run stage). The
        rows start as the backbone's. Returns the task's token ids.
        """
        if task_id in self.token_rows.owners:
            return self.token_rows.ids_of(task_id)
        owned = {t for ids in self.token_rows.owners.values() for t in ids}
        ids = sorted(set(self.untrained_tokens) & {int(t) for t in tokens} - owned)
        if ids:
            weight = self.backbone.get_input_embeddings().weight[torch.tensor(ids)].detach().clone()
            self.put_token_rows(task_id, torch.tensor(ids), weight)
        return ids

    def put_token_rows(self, task_id: str, ids: torch.Tensor, weight: torch.Tensor) -> None:
        """Create (or overwrite) the rows of `task_id`: token `ids[i]` embeds as `weight[i]`."""
        ids = torch.as_tensor(ids, dtype=torch.long).flatten()
        vocab, width = self.backbone.get_input_embeddings().weight.shape
        if weight.shape != (len(ids), width):
            raise ValueError(f"token rows of {task_id!r}: weight has shape {tuple(weight.shape)}, "
                             f"expected ({len(ids)}, {width})")
        if len(ids) and not (0 <= int(ids.min()) and int(ids.max()) < vocab):
            raise ValueError(f"token rows of {task_id!r}: token ids must lie in [0, {vocab})")
        others = {t for owner, own in self.token_rows.owners.items() if owner != task_id for t in own}
        clash = sorted(others & set(ids.tolist()))
        if clash:
            raise ValueError(f"token rows of {task_id!r}: tokens {clash[:5]} belong to another task already")
        reference = self.backbone.get_input_embeddings().weight
        self.token_rows.put(task_id, ids.to(reference.device),
                            weight.detach().to(device=reference.device, dtype=reference.dtype))
        self._row_lookup = None

    def clear_token_rows(self) -> None:
        self.token_rows.clear()
        self._row_lookup = None

    @contextlib.contextmanager
    def only_rows_of(self, task_ids: Iterable[str] | None) -> Iterator[None]:
        """Inside the block only these tasks' rows apply (None: every task's); the other tasks' tokens embed and
        score with the backbone's rows, as before those tasks claimed them. An earlier task runs in the scope of
        the tasks up to it: a later task's trained rows would otherwise compete in its softmax (the tied head
        scores them whatever the route)."""
        with self._scoped(None if task_ids is None else frozenset(task_ids)):
            yield

    @contextlib.contextmanager
    def rows_per_row(self, scopes: list[Iterable[str] | None]) -> Iterator[None]:
        """`only_rows_of` per row: row b of every batch inside the block sees the rows of the tasks in
        `scopes[b]` (None: every task's), so tasks of different scopes share a batch (evaluation, serving)."""
        if not scopes:
            raise ValueError("rows_per_row needs one scope per row of the batch, got none")
        sets = [None if s is None else frozenset(s) for s in scopes]
        with self._scoped(sets[0] if all(s == sets[0] for s in sets) else sets):
            yield

    @contextlib.contextmanager
    def _scoped(self, scope) -> Iterator[None]:
        saved = self._scope
        self._scope = scope
        try:
            yield
        finally:
            self._scope = saved

    def token_rows_parameters(self, task_id: str | None) -> list[nn.Parameter]:
        """The trainable rows of `task_id` (none when it holds none)."""
        return [] if task_id is None else self.token_rows.parameters_of(task_id)

    def _rows(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(token ids, their rows, lookup, shown) of every task's rows, for a batch of `batch` rows; None without
        rows or with none in scope. shown: None (every row), or a (rows,) or (batch, rows) mask (`_shown`)."""
        if not len(self.token_rows.tasks):  # asked on every forward: no owners' id lists built here
            return None
        ids, rows = self.token_rows()
        if self._row_lookup is None or self._row_lookup.device != ids.device:
            vocab = self.backbone.get_input_embeddings().weight.shape[0]
            lookup = torch.full((vocab,), -1, dtype=torch.long, device=ids.device)
            lookup[ids] = torch.arange(len(ids), device=ids.device)
            sizes = torch.tensor([len(entry.ids) for entry in self.token_rows.tasks.values()], device=ids.device)
            self._row_lookup = lookup
            self._row_owner = torch.repeat_interleave(torch.arange(len(sizes), device=ids.device), sizes)
        shown = self._shown(batch)
        if shown is False:
            return None
        return ids, rows, self._row_lookup, shown

    def _shown(self, batch: int) -> torch.Tensor | bool | None:
        """Which rows of the table the active scope shows: None every row, False none, else a (rows,) or (batch,
        rows) mask; computed once per scope and table."""
        scope = self._scope
        if scope is None:
            return None
        cached = self._scope_mask  # by value: a training step's forwards each bring their own set of one scope
        if cached is not None and cached[1] is self._row_lookup and cached[0] == scope:
            mask = cached[2]
        else:
            owners = [entry.task_id for entry in self.token_rows.tasks.values()]
            scopes = [scope] if isinstance(scope, frozenset) else scope
            shown = torch.tensor([[s is None or owner in s for owner in owners] for s in scopes], dtype=torch.bool)
            if isinstance(scope, frozenset) and (shown.all() or not shown.any()):  # decided here, not on a GPU
                mask = None if shown.all() else False
            else:
                mask = shown.to(self._row_owner.device)[:, self._row_owner]
                mask = mask[0] if isinstance(scope, frozenset) else mask
            self._scope_mask = (scope, self._row_lookup, mask)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] != batch:
            raise ValueError(f"token-row scopes were given for {mask.shape[0]} rows, the batch has {batch}: give "
                             "one scope per row of the batch")
        return mask

    def _embed_with_rows(self, module, args, output):
        table = self._rows(args[0].shape[0])
        if table is None:
            return None
        _, rows, lookup, shown = table
        where = lookup[args[0]]  # (batch, seq): the row of each token, -1 for the backbone's own
        # an embedding lookup, not `rows[index]`: on CPU, index's backward adds float gradients with atomic
        # adds at 2+ threads, in an order that changes run to run (the rows, and then the whole run, differed
        # in the last digits); embedding's backward adds them in token order, the bits of a 1-thread run
        row = where.clamp(min=0)
        taken = nn.functional.embedding(row, rows).to(output.dtype)
        use = where >= 0
        if shown is not None:  # a token whose row is out of scope embeds as the backbone's row
            use = use & (shown[row] if shown.dim() == 1 else shown.gather(1, row))
        return torch.where(use.unsqueeze(-1), taken, output)

    def _head_with_rows(self, module, args, output):
        hidden = args[0]
        table = self._rows(hidden.shape[0])
        if table is None:
            return None
        ids, rows, _, shown = table
        logits = (hidden @ rows.to(hidden.dtype).T).to(output.dtype)  # the tied head: a logit is hidden . its row
        if shown is not None:  # an out-of-scope token keeps the backbone's logit
            logits = torch.where(shown if shown.dim() == 1 else shown[:, None, :], logits,
                                 output.index_select(-1, ids))
        return output.index_copy(-1, ids, logits)

    # ------------------------------------------------------------------ routing

    @contextlib.contextmanager
    def route(self, path: list[int] | None) -> Iterator[None]:
        """Run every forward inside the block along `path` (None: the plain backbone)."""
        modules = [None] * self.n_layers if path is None else self._checked_path(path)
        saved = [router.state() for router in self._routers]
        try:
            for router, module_id in zip(self._routers, modules, strict=True):
                router.set_module(module_id)
            yield
        finally:
            for router, state in zip(self._routers, saved, strict=True):
                router.restore(state)

    @contextlib.contextmanager
    def route_batch(self, paths: list[list[int] | None]) -> Iterator[None]:
        """Run row b of every batch inside the block along `paths[b]` (None: the plain backbone).

        A row computes what it computes in a batch of its own path (up to float
        rounding of the frozen backbone over a different batch size).
        """
        if not paths:
            raise ValueError("route_batch needs one path per row of the batch, got none")
        checked = [None if p is None else self._checked_path(p) for p in paths]
        if all(p == checked[0] for p in checked):  # one task: plain routing, no gather/scatter
            with self.route(checked[0]):
                yield
            return
        saved = [router.state() for router in self._routers]
        try:
            for layer, router in enumerate(self._routers):
                router.set_rows([None if p is None else p[layer] for p in checked])
            yield
        finally:
            for router, state in zip(self._routers, saved, strict=True):
                router.restore(state)

    @contextlib.contextmanager
    def mixing(self, candidates: list[list[int]], logits: list[torch.Tensor]) -> Iterator[None]:
        """Per layer, add `sum_k softmax(logits[l])_k * adapter_k(h)` over `candidates[l]`."""
        self._check_mixing(candidates, logits)
        saved = [router.state() for router in self._routers]
        try:
            for router, ids, layer_logits in zip(self._routers, candidates, logits, strict=True):
                router.set_mixture(ids, layer_logits)
            yield
        finally:
            for router, state in zip(self._routers, saved, strict=True):
                router.restore(state)

    def _check_mixing(self, candidates: list[list[int]], logits: list[torch.Tensor]) -> None:
        if len(candidates) != self.n_layers or len(logits) != self.n_layers:
            raise ValueError(
                f"mixing needs one candidate list and one logits tensor per layer "
                f"({self.n_layers}), got {len(candidates)} and {len(logits)}"
            )
        for layer, (ids, layer_logits) in enumerate(zip(candidates, logits, strict=True)):
            if not ids or len(set(ids)) != len(ids):
                raise ValueError(f"candidates[{layer}] must be non-empty and distinct, got {ids}")
            for module_id in ids:
                self._check_module(layer, module_id)
            if tuple(layer_logits.shape) != (len(ids),):
                raise ValueError(
                    f"logits[{layer}] must have shape ({len(ids)},) for candidates {ids}, "
                    f"got {tuple(layer_logits.shape)}"
                )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        path: list[int] | None = None,
        task_id: str | None = None,
        paths: list[list[int] | None] | None = None,
        scope: Iterable[str] | None = None,
        scopes: list[Iterable[str] | None] | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ):
        """The backbone's CausalLMOutput, along `path` / the task's path / one path per row / the active route,
        seeing the token rows of the tasks in `scope` (`scopes`: one per row; default: the active scope)."""
        if sum(x is not None for x in (path, task_id, paths)) > 1:
            raise ValueError("give either path or task_id (or paths: one per row), not several")
        if task_id is not None:
            path = self.path_of(task_id)
        if (path is not None or paths is not None) and self.training and _activation_checkpointing(self.backbone):
            raise RuntimeError(
                "with gradient checkpointing, blocks are recomputed during backward, after a "
                "per-call path is reset: run forward and backward inside `with model.route(path):`"
            )  # a scope needs no such care: rows live in the embedding and the head, which are not recomputed
        # no path: whatever route/mixing is active; none -> the plain backbone
        with self._routing(path, paths, scope, scopes):
            return self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )

    def generate(self, input_ids: torch.Tensor, *, path: list[int] | None = None,
                 paths: list[list[int] | None] | None = None, scope: Iterable[str] | None = None,
                 scopes: list[Iterable[str] | None] | None = None, **kwargs):
        """`backbone.generate` along `path`, or `paths` (one per row), else the active route; with the token
        rows of `scope` (or `scopes`, one per row), else the active scope."""
        if path is not None and paths is not None:
            raise ValueError("give either path or paths, not both")
        with self._routing(path, paths, scope, scopes):
            return self.backbone.generate(input_ids=input_ids, **kwargs)

    @contextlib.contextmanager
    def _routing(self, path, paths, scope=None, scopes=None) -> Iterator[None]:
        if scope is not None and scopes is not None:
            raise ValueError("give either scope or scopes (one per row), not both")
        with contextlib.ExitStack() as stack:
            if paths is not None:
                stack.enter_context(self.route_batch(paths))
            elif path is not None:
                stack.enter_context(self.route(path))
            if scope is not None:
                stack.enter_context(self.only_rows_of(scope))
            elif scopes is not None:
                stack.enter_context(self.rows_per_row(scopes))
            yield

    # ------------------------------------------------------------- parameters

    def module_parameters(self, layer: int, module_id: int) -> list[nn.Parameter]:
        return list(self.get_module(layer, module_id).parameters())

    def trainable_parameters(self, path: list[int]) -> list[nn.Parameter]:
        """The parameters of the modules on `path`, layer by layer, in a fixed order."""
        path = self._checked_path(path)
        return [p for layer, m in enumerate(path) for p in self.module_parameters(layer, m)]

    def set_trainable(self, path: list[int] | None) -> None:
        """requires_grad True only for the modules on `path` (None: nothing trains)."""
        chosen = [] if path is None else self.trainable_parameters(path)
        self.requires_grad_(False)
        for param in chosen:
            param.requires_grad_(True)

    # --------------------------------------------------------------- selection

    @contextlib.contextmanager
    def capture_block_inputs(self) -> Iterator[BlockInputs]:
        """Record, for every block, its input hidden states (detached) of the latest call."""
        record = BlockInputs(layers=[None] * self.n_layers)

        def hook_for(layer: int):
            def hook(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                record.layers[layer] = hidden.detach()  # (batch, seq, d_model)

            return hook

        handles = [
            block.register_forward_pre_hook(hook_for(layer), with_kwargs=True)
            for layer, block in enumerate(self.blocks)
        ]
        try:
            yield record
        finally:
            for handle in handles:
                handle.remove()


class TaskRows(nn.Module):
    """One task's embedding rows: token `ids[i]` embeds (and is scored by the tied head) as `weight[i]`."""

    def __init__(self, task_id: str, ids: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.task_id = task_id
        # not in state dicts: an engine checkpoint holds the trainable weight; the ids travel as modeling.io's keys
        self.register_buffer("ids", ids, persistent=False)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self) -> torch.Tensor:
        return self.weight  # a call, so ZeRO-3 gathers the weight first


class TokenTable(nn.Module):
    """Every task's `TaskRows`, keyed by a digest of the task id (task ids hold dots, which keys cannot), so a
    task's weight has the same name in every replica and checkpoint, in whatever order the tasks were put."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = nn.ModuleDict()

    @property
    def owners(self) -> dict[str, list[int]]:
        return {rows.task_id: rows.ids.tolist() for rows in self.tasks.values()}

    @staticmethod
    def _key(task_id: str) -> str:
        return "t" + hashlib.sha256(task_id.encode()).hexdigest()[:16]

    def ids_of(self, task_id: str) -> list[int]:
        key = self._key(task_id)
        return self.tasks[key].ids.tolist() if key in self.tasks else []

    def parameters_of(self, task_id: str) -> list[nn.Parameter]:
        key = self._key(task_id)
        return [self.tasks[key].weight] if key in self.tasks else []

    def put(self, task_id: str, ids: torch.Tensor, weight: torch.Tensor) -> None:
        self.tasks[self._key(task_id)] = TaskRows(task_id, ids, weight.clone())

    def clear(self) -> None:
        self.tasks = nn.ModuleDict()

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, rows) of every task, concatenated."""
        entries = list(self.tasks.values())
        return torch.cat([rows.ids for rows in entries]), torch.cat([rows() for rows in entries])


def _activation_checkpointing(backbone: GPT2LMHeadModel) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (which now warns); 4.x has only the old name
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(backbone), name):
            return bool(getattr(backbone, name))
    return False


def grow_vocabulary(backbone: GPT2LMHeadModel, *, vocab_size: int, seed: int = 0) -> None:
    """Resize the embeddings to `vocab_size` rows; new rows are distinct and seeded.

    Each new row is `mean + std * z` (per-dimension statistics of the existing
    rows, z ~ N(0, 1) from a generator seeded with `seed`), so reserved tokens
    look like ordinary tokens but can be told apart, and the same checkpoint
    and seed always give the same rows.
    """
    old = backbone.get_input_embeddings().weight.shape[0]
    if vocab_size < old:
        raise ValueError(
            f"vocab_size {vocab_size} is smaller than the checkpoint's {old}: "
            "tokens would be lost; pass vocab_size >= the checkpoint's size (or None)"
        )
    if vocab_size == old:
        return
    backbone.resize_token_embeddings(vocab_size, mean_resizing=False)
    # rows the checkpoint recorded as untrained (a run's own backbone) stay untrained: keep them claimable
    recorded = [int(t) for t in getattr(backbone.config, "dmea_untrained_tokens", None) or []]
    backbone.config.dmea_untrained_tokens = [*recorded, *range(old, vocab_size)]
    generator = torch.Generator().manual_seed(seed)
    weights = [backbone.get_input_embeddings().weight]
    output = backbone.get_output_embeddings()
    if output is not None and output.weight is not weights[0]:
        weights.append(output.weight)  # untied head: its new rows need the same treatment
    with torch.no_grad():
        for weight in weights:
            existing = weight[:old].float()
            noise = torch.randn(vocab_size - old, weight.shape[1], generator=generator)
            new_rows = existing.mean(0) + existing.std(0) * noise
            weight[old:] = new_rows.to(device=weight.device, dtype=weight.dtype)
