"""FSDP2 for vlmtune: the model sharded once by transformer block with PyTorch's
``fully_shard``, and the few places where sharded parameters need a collective.

Why vlmtune shards the model itself rather than through ``accelerator.prepare``:
Accelerate applies FSDP only to GPU-type multi-process runs (its ``AcceleratorState``
never sets ``DistributedType.FSDP`` for ``MULTI_CPU``), and under FSDP its ``prepare``
wants the model with every optimizer, while vlmtune builds a new optimizer at each
stage boundary over the already-sharded parameters. So the settings come from
Accelerate (an Accelerate config file's ``fsdp_config``, exported by ``accelerate
launch`` as ``FSDP_*`` variables and read by its ``FullyShardedDataParallelPlugin``)
or from ``train.fsdp.*``; the sharding is ``torch.distributed.fsdp.fully_shard``, the
same call Accelerate makes, on GPUs and on CPU processes (gloo) alike.

Where sharded parameters meet code that runs on one process or in uneven amounts:

- checkpoints: the trained tensors and the optimizer state are gathered to full
  tensors (``DTensor.full_tensor``, every process in the same order) and saved as a
  one-process run saves them, so a checkpoint does not depend on the world size;
- loading (resume, final evaluation): full tensors are cut into each process's shard
  (``distribute_tensor`` with every process holding the whole tensor, no traffic);
- evaluation and cache filling: :func:`full_params` gathers every unit's parameters
  once, collectively, and keeps them gathered until the block ends, so each process
  may then make any number of forward calls (evaluation shards records unevenly, the
  main process alone fills the feature cache). It costs the whole model's memory on
  each process for that time, what inference of the model needs anyway.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from vlmtune.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.fsdp import FSDPModule

log = logging.getLogger("vlmtune")


@dataclass(frozen=True)
class FsdpSettings:
    """How the model is sharded (from ``train.fsdp`` or the Accelerate launcher)."""

    reshard_after_forward: bool = True
    cpu_offload: bool = False
    wrap: tuple[str, ...] | None = None  # module class names; None: the backbone's transformer blocks
    source: str = "train.fsdp"  # where the settings came from, for messages
    mixed_precision: str = "no"  # "no", "bf16" or "fp16": FSDP2's parameter / compute dtype
    extra: dict[str, Any] = field(default_factory=dict)


def launcher_wants_fsdp() -> bool:
    """An Accelerate config file with ``distributed_type: FSDP`` (``accelerate launch``
    exports ``ACCELERATE_USE_FSDP=true`` to every process)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_settings(cfg: Any) -> FsdpSettings | None:
    """The FSDP settings of this run, or None for no FSDP. ``train.fsdp.enabled`` wins;
    otherwise an Accelerate launcher configured for FSDP turns it on with its own
    ``fsdp_config`` (version 2 only; activation checkpointing through
    ``backbone.gradient_checkpointing``)."""
    f = cfg.train.fsdp
    if f.enabled:
        return FsdpSettings(
            reshard_after_forward=f.reshard_after_forward,
            cpu_offload=f.cpu_offload,
            wrap=tuple(f.wrap) if f.wrap else None,
            source="train.fsdp",
        )
    if not launcher_wants_fsdp():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    version = os.environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"accelerate config: fsdp_version {version}: vlmtune shards with FSDP2; set "
            f"fsdp_config.fsdp_version: 2 (see configs/accelerate/fsdp.yaml)"
        )
    if os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise ConfigError(
            "accelerate config: fsdp_activation_checkpointing: vlmtune checkpoints the blocks that "
            "train itself; set backbone.gradient_checkpointing=true instead"
        )
    plugin = FullyShardedDataParallelPlugin()
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    if plugin.auto_wrap_policy is size_based_auto_wrap_policy:
        raise ConfigError(
            "accelerate config: fsdp_auto_wrap_policy: SIZE_BASED_WRAP is not supported; use "
            "TRANSFORMER_BASED_WRAP (the default: the backbone's transformer blocks)"
        )
    from torch.distributed.fsdp import CPUOffloadPolicy

    names = plugin.transformer_cls_names_to_wrap
    return FsdpSettings(
        reshard_after_forward=bool(plugin.reshard_after_forward),
        cpu_offload=isinstance(plugin.cpu_offload, CPUOffloadPolicy),
        wrap=tuple(names) if names else None,
        source="accelerate config (fsdp_config)",
    )


def block_classes(model: nn.Module) -> list[str]:
    """The transformer block classes of every transformers model inside ``model``
    (their ``_no_split_modules``: InternVLVisionLayer, Qwen2DecoderLayer, ...)."""
    names: list[str] = []
    for m in model.modules():
        for n in sorted(getattr(m, "_no_split_modules", None) or []):  # a set in some models
            if n not in names:
                names.append(n)
    return names


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, settings: FsdpSettings) -> nn.Module:
    """``fully_shard`` every transformer block of ``model`` (each its own unit: its
    weights are gathered for its forward and backward only), then the model itself
    (the rest: embeddings, projector, adapters, heads). In place; a second call is a
    no-op, so stages after the first keep the sharding and only change what trains
    (``requires_grad`` on the sharded parameters, which FSDP2 reads at each gather)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    if is_sharded(model):
        return model
    names = list(settings.wrap) if settings.wrap else block_classes(model)
    present = {type(m).__name__ for m in model.modules()}
    missing = [n for n in names if n not in present]
    if missing:
        key = "train.fsdp.wrap" if settings.source == "train.fsdp" else "accelerate config: fsdp_transformer_layer_cls_to_wrap"
        raise ConfigError(
            f"{key}: no module of class {missing[0]} in this model "
            f"(its transformer blocks: {', '.join(block_classes(model)) or 'none'})"
        )
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(settings.mixed_precision)
    # FSDP's all-gathers and reduce-scatters on a process group of their own: the losses
    # make collectives of their own in backward (the contrastive all_gather's all_reduce),
    # and where a process's batch has no box or relation target its autograd graph, and
    # so the order of those calls among FSDP's, differs from the other processes'.
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = DeviceMesh.from_group(dist.new_group(backend=dist.get_backend()), device_type)
    kwargs: dict[str, Any] = {
        "mesh": mesh,
        "reshard_after_forward": settings.reshard_after_forward,
        "offload_policy": CPUOffloadPolicy() if settings.cpu_offload else OffloadPolicy(),
        # Gradients are reduced in float32 whatever the compute dtype.
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy(),
    }
    # fully_shard cannot split a 0-d parameter (the retrieval temperature): such
    # parameters stay whole on every process, their gradients averaged by a hook.
    scalars = [p for p in model.parameters() if p.ndim == 0]
    if scalars:
        kwargs["ignored_params"] = set(scalars)
        _average_gradients(scalars)
    units = [m for m in model.modules() if type(m).__name__ in names]
    for m in reversed(units):  # innermost first, as fully_shard expects
        fully_shard(m, **kwargs)
    root = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}  # the root keeps its params for backward
    fully_shard(model, **root)
    model.register_forward_hook(_every_trainable_weight_in_the_graph, prepend=True)
    if dist.get_backend() == "gloo":
        # gloo runs a collective to its end before returning. FSDP prefetches the next
        # unit's weights at the start of backward, where the process whose batch has no
        # box target may instead be in the contrastive gather's all_reduce: each would
        # wait for the other. Issued asynchronously (on FSDP's own group) the prefetch
        # lets both reach the all_reduce, and it is waited for when the unit needs it.
        for unit in _units(model):
            unit._set_unshard_async_op(True)
    log.info(
        "FSDP2 (%s): %d units of %s plus the rest of the model, reshard_after_forward=%s, cpu_offload=%s",
        settings.source,
        len(units),
        ", ".join(names) or "nothing",
        settings.reshard_after_forward,
        settings.cpu_offload,
    )
    return model


def _every_trainable_weight_in_the_graph(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook of the sharded model, run before FSDP's own: every loss term gets
    ``0 * sum`` of the trainable weights the rest of the model (the root unit: projector,
    adapters, heads) holds. FSDP2 reduce-scatters the gradients a process has, so a head
    that one process's batch leaves unused (no box target in it) would make the
    processes' reduce-scatters differ in size; with a zero gradient every process has
    all of them, which is what DDP's find_unused_parameters achieves. The values and the
    gradients are unchanged."""
    from torch.distributed.tensor import DTensor

    if not torch.is_grad_enabled() or not isinstance(output, dict):
        return output
    live = [p for p in module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if not live:
        return output
    zero = cast(torch.Tensor, sum(p.reshape(-1)[0] for p in live)) * 0.0  # live is not empty: a tensor
    return {
        k: (v + zero.to(v.dtype) if isinstance(v, torch.Tensor) and v.requires_grad and v.ndim == 0 else v)
        for k, v in output.items()
    }


def _average_gradients(params: list[nn.Parameter]) -> None:
    """After each backward, each parameter's gradient averaged over the processes (what
    DDP does), on a process group of their own so these all-reduces never interleave
    with FSDP's collectives. Linear, so it holds under gradient accumulation: the part
    already averaged stays the same on every process."""
    import torch.distributed as dist

    group = dist.new_group(backend=dist.get_backend())
    world = dist.get_world_size()

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(world)

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def _units(model: nn.Module) -> list[FSDPModule]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]  # the root first (pre-order)


@contextlib.contextmanager
def full_params(model: nn.Module) -> Iterator[None]:
    """Every FSDP unit's parameters gathered (one collective per unit, on every process)
    for the block, and kept gathered across forward calls, so the processes may then
    run different numbers of forwards or call any method; resharded at the end. A plain
    pass-through for a model that is not sharded."""
    zero3 = _zero3_params(model)
    if zero3:  # DeepSpeed ZeRO-3 partitions the weights: the same, through DeepSpeed
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            yield
        return
    if not is_sharded(model):
        yield
        return
    units = _units(model)
    # The root's lazy init marks every other unit as a non-root one; without it a unit
    # called first (the main process filling a cache calls the vision blocks) takes
    # itself for the root and FSDP refuses the later forwards through the real root.
    cast("FSDPModule", model)._get_fsdp_state()._lazy_init()  # sharded: fully_shard made it an FSDPModule
    before = []
    for m in units:
        group = m._get_fsdp_state()._fsdp_param_group
        before.append(group is not None and group.post_forward_mesh_info is not None)
        m.set_reshard_after_forward(False, recurse=False)
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m, reshard in zip(units, before):
            m.reshard()
            m.set_reshard_after_forward(reshard, recurse=False)
        # FSDP records the order of forwards to prefetch in the next backward; these
        # forwards were this process's own (another process made more or fewer), so a
        # prefetch from them would be a collective the other processes never join.
        for m in units:
            state = m._get_fsdp_state()
            if state._fsdp_param_group is not None:
                state._fsdp_param_group._post_forward_indices.clear()
            state._comm_ctx.post_forward_order.clear()


def _zero3_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 partitioned (they carry ``ds_id``); none otherwise."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def loading(model: nn.Module) -> Iterator[None]:
    """Around ``load_state_dict`` of whole tensors: under DeepSpeed ZeRO-3 the weights
    gathered and, at the end, partitioned again from the main process's values (every
    process loads the same file). Nothing to do otherwise (FSDP: :func:`shard_weights`)."""
    zero3 = _zero3_params(model)
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero3, modifier_rank=0):
        yield


def _full(t: Any) -> Any:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_tensors(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named state-dict tensors of ``model`` whole, on the CPU. Collective under
    FSDP: every process must call it with the same names (in the same order)."""
    sd = model.state_dict()
    return {k: _full(sd[k]).detach().cpu() for k in names}


def full_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict()`` with every sharded tensor made whole (on the CPU):
    the format of a one-process run. Collective under FSDP: every process calls it."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for k in sorted(state["state"]):
        out["state"][k] = {
            n: (_full(v).detach().cpu() if isinstance(v, torch.Tensor) else v) for n, v in state["state"][k].items()
        }
    return out


def _shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or isinstance(value, DTensor) or value.shape != like.shape:
        return value
    # Every process holds the whole tensor: each keeps its own shard, nothing is sent.
    return distribute_tensor(value.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None)


def shard_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole tensors (a checkpoint's) cut to this process's shards of ``model``'s
    parameters, ready for ``load_state_dict``; unchanged for a model that is not sharded."""
    if not is_sharded(model):
        return weights
    own = model.state_dict()
    return {k: _shard_like(v, own[k]) if k in own else v for k, v in weights.items()}


def load_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Load a whole (one-process format) optimizer state into an optimizer over sharded
    parameters: each tensor cut to the shard of its parameter. Plain ``load_state_dict``
    for parameters that are not sharded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    per = {}
    for k, entry in state["state"].items():
        p = params[int(k)] if int(k) < len(params) else None
        per[k] = {
            n: (_shard_like(v, p) if p is not None and isinstance(v, torch.Tensor) and v.ndim > 0 else v)
            for n, v in entry.items()
        }
    optimizer.load_state_dict({"param_groups": state["param_groups"], "state": per})
