"""The plain settings every kernel is built from, resolved from the config at the entry point.

    engine = engine_settings(config)      # DeepSpeed's config dict, the eta clamp (adaptation)
    decoding = decoding_settings(config)  # pseudo samples and evaluation answers

No worker ever receives a RunConfig: the kernels (dmea_dist.kernels, and on Ray
dmea_dist.distributed.kernels) get these. This module imports neither torch nor
the model: the driver resolves them before Ray starts (`launch_ranks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dmea_dist.config import RunConfig, deepspeed_config


@dataclass(frozen=True)
class DecodingSettings:
    """Generation settings of pseudo samples and of evaluation answers."""

    pseudo_top_k: int = 20
    pseudo_answer: str = "greedy"  # answers of pseudo samples: greedy after the separator, or sampled
    pseudo_separator: str = "free"  # "one": a pseudo sample keeps exactly one separator (OneSeparator)
    batch_size: int = 32
    max_new_tokens: int = 64
    decoding: str = "greedy"  # evaluation answers: greedy or top_k
    top_k: int = 20
    seed: int = 0


@dataclass(frozen=True)
class EngineSettings:
    """The adaptation engine: DeepSpeed's own config dict and the eta clamp."""

    ds_config: dict[str, Any]
    clamp: tuple[float, float]
    virtual_shards: int = 0  # train.virtual_shards (dmea_dist.engine)

    @property
    def partitions_model(self) -> bool:
        return self.ds_config.get("zero_optimization", {}).get("stage", 0) == 3

    def factory(self) -> Callable[..., Any]:
        """(model, params) -> the DeepSpeed engine with the gradient-scaling step."""
        settings = self

        def build(model, params):
            from dmea_dist.engine import build_engine  # DeepSpeed lives there only

            return build_engine(model, params, ds_config=settings.ds_config, clamp=settings.clamp,
                                virtual_shards=settings.virtual_shards)

        build.partitions_model = self.partitions_model
        return build


def engine_settings(config: RunConfig) -> EngineSettings:
    """DeepSpeed's config for adaptation; full fine-tuning (lamol, finetune) at `train.full_finetune_lr`."""
    from dmea_dist.run import build_policy

    t = config.train
    lr = t.full_finetune_lr if build_policy(config).full_finetune else t.lr
    ds = deepspeed_config(config.deepspeed, lr=lr, weight_decay=t.weight_decay, eps=t.adam_eps,
                          grad_clip=t.grad_clip, micro_batch=t.batch_size)
    return EngineSettings(ds_config=ds, clamp=tuple(config.method.adaptation.eta_clamp),
                          virtual_shards=t.virtual_shards)


def decoding_settings(config: RunConfig) -> DecodingSettings:
    ev = config.eval
    ad = config.method.adaptation
    return DecodingSettings(pseudo_top_k=ad.top_k_sampling, pseudo_answer=ad.pseudo_answer,
                            pseudo_separator=ad.pseudo_separator,
                            batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens, decoding=ev.decoding,
                            top_k=ev.top_k, seed=config.train.seed)
