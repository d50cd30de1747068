"""Adapters, modules and the per-layer routing that puts them on a GPT-2 block.

A *module* in layer `l` is a pair of bottleneck adapters: one on the output of
the attention sublayer of block `l`, one on the output of its MLP sublayer,
each computing `h <- h + up(act(down(h)))`. `up` starts at zero, so a fresh
module is exactly the identity and adding one never changes what the model
computes until it is trained.

Key decisions:
- The original `block.attn` / `block.mlp` are wrapped (peft style) by
  `RoutedSublayer`, which calls the original and then asks the layer's
  `LayerRouter` what to add. The router is a plain object (not an
  `nn.Module`), so the pool of modules is registered exactly once, in the
  owning `DMEAModel`, never a second time under the backbone.
- The router holds the *active* route only for the duration of a call (the
  model sets and restores it in context managers). With no route the wrapper
  returns the original output untouched: the plain backbone runs.
- Mixing (expansion) computes the softmax of the caller's logits on every
  call, so each forward builds a fresh autograd graph to the logits.
- Per-row routing (several tasks in one batch, like PEFT's per-sample
  adapter names): each row of the batch names its own module (or None: the
  plain backbone). The rows of one module are gathered, run through that
  module's adapter and scattered back, so a row computes exactly what a
  batch of its own task computes; the groups are built once per route, not
  per call. The batch must keep its rows in order (`generate` with greedy
  or top-k decoding does; beam search, which reorders rows, does not).
"""

from __future__ import annotations

import torch
from torch import nn

SITES = ("attn", "mlp")  # where a module's two adapters sit in a block


class BottleneckAdapter(nn.Module):
    """`up(relu(down(h)))`: the increment one adapter adds to a sublayer output."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(d_model, bottleneck)
        self.up = nn.Linear(bottleneck, d_model)
        self.act = nn.ReLU()
        # Zero `up`: a fresh adapter adds exactly 0, so the model is unchanged.
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw `down` (nn.Linear's default init, optionally seeded) and zero `up`."""
        bound = 1.0 / self.down.in_features**0.5
        with torch.no_grad():
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.uniform_(-bound, bound, generator=generator)
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (batch, seq, d_model) -> increment of the same shape
        return self.up(self.act(self.down(h)))


class LayerModule(nn.Module):
    """One *module*: the attention-site and MLP-site adapters of one layer."""

    def __init__(self, d_model: int, bottleneck: int) -> None:
        super().__init__()
        self.attn = BottleneckAdapter(d_model, bottleneck)
        self.mlp = BottleneckAdapter(d_model, bottleneck)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.attn.reset_parameters(generator)
        self.mlp.reset_parameters(generator)

    def adapter(self, site: str) -> BottleneckAdapter:
        return self.attn if site == "attn" else self.mlp


def mixing_weights(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer, the softmax of its candidate logits: the weights mixing uses."""
    return [torch.softmax(layer_logits, dim=-1) for layer_logits in logits]


class LayerRouter:
    """The active route of one layer: nothing, one module id, a mixture, or one module id per row.

    `pool` is the layer's `nn.ModuleDict` (str(module_id) -> LayerModule),
    owned by the model; the router only reads it.
    """

    def __init__(self, pool: nn.ModuleDict) -> None:
        self.pool = pool
        self.module_id: int | None = None
        self.candidates: list[int] | None = None
        self.logits: torch.Tensor | None = None
        self.rows: RowGroups | None = None

    def state(self) -> tuple:
        return (self.module_id, self.candidates, self.logits, self.rows)

    def restore(self, state: tuple) -> None:
        self.module_id, self.candidates, self.logits, self.rows = state

    def set_module(self, module_id: int | None) -> None:
        self.restore((module_id, None, None, None))

    def set_mixture(self, candidates: list[int], logits: torch.Tensor) -> None:
        self.restore((None, list(candidates), logits, None))

    def set_rows(self, module_ids: list[int | None]) -> None:
        """Row b of every batch uses module `module_ids[b]` (None: no adapter for that row)."""
        self.restore((None, None, None, RowGroups.of(module_ids)))

    def apply(self, site: str, h: torch.Tensor) -> torch.Tensor:
        """The sublayer output `h` (batch, seq, d_model) after this layer's adapters."""
        if self.module_id is not None:
            return h + self.pool[str(self.module_id)].adapter(site)(h)
        if self.candidates is not None:
            # (k,) weights, same at both sites of the layer
            weights = torch.softmax(self.logits, dim=-1).to(device=h.device, dtype=h.dtype)
            delta = sum(
                weights[k] * self.pool[str(module_id)].adapter(site)(h)
                for k, module_id in enumerate(self.candidates)
            )
            return h + delta
        if self.rows is not None:
            return h + self.rows.delta(h, lambda module_id, x: self.pool[str(module_id)].adapter(site)(x))
        return h


class RowGroups:
    """The rows of a batch grouped by the module they use: {module id: row indices}."""

    def __init__(self, n_rows: int, groups: dict[int, torch.Tensor]) -> None:
        self.n_rows = n_rows
        self.groups = groups  # module id -> (rows,) long indices, ascending

    @classmethod
    def of(cls, module_ids: list[int | None]) -> RowGroups:
        by_module: dict[int, list[int]] = {}
        for row, module_id in enumerate(module_ids):
            if module_id is not None:
                by_module.setdefault(int(module_id), []).append(row)
        return cls(len(module_ids), {m: torch.tensor(rows, dtype=torch.long) for m, rows in by_module.items()})

    def delta(self, h: torch.Tensor, adapter) -> torch.Tensor:
        """Sum of each row's adapter increment; `adapter(module_id, h_rows)` -> increment of h_rows."""
        if h.shape[0] != self.n_rows:
            raise ValueError(f"per-row routing was set for {self.n_rows} rows but the batch has {h.shape[0]}; "
                             "route_batch needs one path per row, rows kept in order (no beam search)")
        delta = torch.zeros_like(h)  # (batch, seq, d_model)
        for module_id, rows in self.groups.items():
            rows = rows.to(h.device)
            delta.index_copy_(0, rows, adapter(module_id, h.index_select(0, rows)))
        return delta


class RoutedSublayer(nn.Module):
    """Wraps `block.attn` or `block.mlp`: the original output plus the routed adapters.

    The attention sublayer returns a tuple `(attn_output, attn_weights)`; only
    `attn_output` is adapted. The MLP returns a tensor.
    """

    def __init__(self, base: nn.Module, router: LayerRouter, site: str) -> None:
        super().__init__()
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        self.base = base
        self.site = site
        self._router = router  # plain object: not registered as a submodule

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = self.base(hidden_states, *args, **kwargs)
        if isinstance(out, tuple):
            return (self._router.apply(self.site, out[0]), *out[1:])
        return self._router.apply(self.site, out)

    def __getattr__(self, name: str):
        # Code that reads attributes of the original (e.g. `attn.layer_idx`) still works.
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(self.base, name)
