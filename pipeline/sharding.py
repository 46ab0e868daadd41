"""What the sharding backends (FSDP2, DeepSpeed ZeRO-3) change for code that reads weights.

Under DDP and ZeRO-1/2 every process holds every weight. Under FSDP2 the parameters of a
prepared model are DTensor shards, made whole by hooks around the forward of the prepared
module and of its wrapped layers; under ZeRO-3 they are empty placeholders, made whole by
DeepSpeed's hooks around each submodule's forward. Inside those forwards the weights are whole;
anywhere else (sampling, evaluation, the saved model, checkpoints) they are not, and making
them whole is a collective that every process must join, in the same order.

Three rules follow:
- a weight read outside its module's forward is checked with ``is_partial``, and a partial one
  is left to the module's own forward, where the backend's hooks gather it;
- sampling, evaluation and the saved model use a ``WholeCopy``: a copy of the model taken before
  ``accelerator.prepare``, kept on the meta device (no memory) and filled from the shards when
  needed (one gather per rollout or evaluation), which then runs without collectives, so
  processes may take different numbers of steps;
- checkpoints hold whole tensors: gathered weights and, under FSDP2, the full optimizer state
  keyed by parameter name; under DeepSpeed, the engine's own checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from accelerate.utils import DistributedType

from pipeline.errors import PipelineError

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch built without distributed support has no shards to handle
    DTensor = None
    distribute_tensor = None

REPLICATED, FSDP, DEEPSPEED = "replicated", "fsdp", "deepspeed"


def is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def is_zero3(tensor: torch.Tensor) -> bool:
    """A parameter that DeepSpeed ZeRO-3 partitions (it tags each with a ``ds_id``)."""
    return hasattr(tensor, "ds_id")


def is_partial(tensor: torch.Tensor) -> bool:
    """Whether this process holds less than the whole tensor: an FSDP2 shard, or the empty
    placeholder ZeRO-3 leaves in a parameter between gathers."""
    return is_dtensor(tensor) or tensor.numel() == 0


def backend(accelerator) -> str:
    """``fsdp``, ``deepspeed``, or ``replicated`` (one process, DDP)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return FSDP
    if kind == DistributedType.DEEPSPEED:
        return DEEPSPEED
    return REPLICATED


def zero_stage(accelerator) -> int:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if plugin is not None else 0


def shards_parameters(accelerator) -> bool:
    kind = backend(accelerator)
    return kind == FSDP or (kind == DEEPSPEED and zero_stage(accelerator) == 3)


def backend_problems(distributed_type, env: Mapping[str, str], fsdp_version: int | None = None,
                     fsdp_ram_efficient_loading: bool = False,
                     zero3_init: bool = False) -> list[str]:
    """What in the launch setup the pipeline cannot run under; empty when it can.

    ``env`` is the launcher's environment (accelerate passes the config to the processes in
    ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED``); the other values are those of the
    Accelerator's plugins.
    """
    def flag(name: str) -> bool:
        return str(env.get(name, "false")).lower() in ("1", "true", "yes")

    problems = []
    if flag("ACCELERATE_USE_FSDP") and distributed_type != DistributedType.FSDP:
        problems.append(
            "the accelerate config asks for FSDP, but accelerate runs FSDP on GPUs only: on "
            "CPUs these processes would train as plain DDP; launch with "
            "configs/accelerate/cpu_2proc.yaml (DDP over gloo), or on GPUs")
    if flag("ACCELERATE_USE_DEEPSPEED") and distributed_type != DistributedType.DEEPSPEED:
        problems.append(
            "the accelerate config asks for DeepSpeed, but accelerate runs DeepSpeed on GPUs "
            "only; launch with configs/accelerate/cpu_2proc.yaml (DDP over gloo), or on GPUs")
    if distributed_type == DistributedType.FSDP and fsdp_version != 2:
        problems.append(f"fsdp_version: {fsdp_version} is not supported; set fsdp_version: 2 "
                        "(FSDP2, torch's fully_shard) in the accelerate config")
    # Both make every process but the first load models as empty tensors, to be filled when
    # accelerate prepares them; the pipeline also loads models it never prepares (the PPO
    # reference and reward model, the policy the reward stage normalizes on).
    if distributed_type == DistributedType.FSDP and fsdp_ram_efficient_loading:
        problems.append("fsdp_cpu_ram_efficient_loading: true leaves the models that are never "
                        "prepared (reference, reward model) empty on all processes but the "
                        "first; set it to false in the accelerate config")
    if distributed_type == DistributedType.DEEPSPEED and zero3_init:
        problems.append("zero3_init_flag: true partitions the models that are never prepared "
                        "(reference, reward model) with no engine to gather them; set it to "
                        "false in the accelerate config")
    return problems


def check_backend(accelerator, env: Mapping[str, str]) -> None:
    """Refuse, in one line, a launch setup the pipeline cannot run under (see backend_problems)."""
    state = accelerator.state
    fsdp = getattr(state, "fsdp_plugin", None)
    deepspeed = getattr(state, "deepspeed_plugin", None)
    problems = backend_problems(
        accelerator.distributed_type, env,
        fsdp_version=getattr(fsdp, "fsdp_version", None),
        fsdp_ram_efficient_loading=bool(getattr(fsdp, "cpu_ram_efficient_loading", False)),
        zero3_init=bool(getattr(deepspeed, "zero3_init_flag", False)))
    if problems:
        raise PipelineError("; ".join(problems))


@torch.no_grad()
def broadcast_from_main(model: torch.nn.Module, accelerator) -> None:
    """Every process's copy of ``model`` made the main process's, before it is prepared.

    DDP does this when it wraps a model; FSDP2 shards each process's own copy as it is, so
    weights drawn at random per process (a fresh LoRA adapter, seeded with the process index)
    would make a model that no single process built.
    """
    if accelerator.num_processes == 1 or backend(accelerator) == REPLICATED:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        torch.distributed.broadcast(tensor.data, src=0)


@contextlib.contextmanager
def gathered(model: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """ZeRO-3: every parameter of ``model`` whole for the duration (a collective); with
    ``modifier_rank`` set, that process's writes are what every process keeps. A no-op
    elsewhere: FSDP2 shards are made whole one by one (``whole_tensor``)."""
    params = [p for p in model.parameters() if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter: an FSDP2 shard all-gathered (a collective), any other
    tensor as it is (a ZeRO-3 parameter must be inside ``gathered``)."""
    if is_dtensor(tensor):
        return tensor.full_tensor()
    if tensor.numel() == 0:
        raise RuntimeError("an empty (ZeRO-3 partitioned) parameter read outside gathered()")
    return tensor


@torch.no_grad()
def whole_state(model: torch.nn.Module, trainable_only: bool = True) -> dict[str, torch.Tensor]:
    """The whole parameters by name, on the CPU (a collective under sharding: every process
    calls it); only those that train when ``trainable_only``. A tensor that already was whole
    on the CPU is returned as it is, sharing the parameter's storage."""
    out = {}
    with gathered(model):
        for name, p in model.named_parameters():
            if trainable_only and not p.requires_grad:
                continue
            out[name] = whole_tensor(p).detach().cpu().contiguous()
    return out


@torch.no_grad()
def load_whole_state(model: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Whole tensors into ``model``'s parameters of the same names, sharded as they are (every
    process passes the same ``weights``)."""
    params = dict(model.named_parameters())
    with gathered(model, modifier_rank=0):
        for name, tensor in weights.items():
            p = params[name]
            value = tensor.to(p.device, p.dtype)
            if is_dtensor(p):
                # Every process holds the whole tensor, so each cuts its own shard: no traffic.
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)


def _owner(optimizer, models: Mapping[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The model whose parameters ``optimizer`` steps (None for a scheduler, which holds an
    ``optimizer`` too)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        return None
    groups = optimizer.param_groups
    if not groups or not groups[0]["params"]:
        return None
    first = groups[0]["params"][0]
    for model in models.values():
        if any(p is first for p in model.parameters()):
            return model
    return None


def optimizer_state(optimizer, models: Mapping[str, torch.nn.Module]) -> dict[str, Any]:
    """What a checkpoint keeps of an optimizer or scheduler. Under FSDP2 it is the whole
    optimizer state keyed by parameter name (a collective; whole on the main process only)."""
    owner = _owner(optimizer, models)
    inner = getattr(optimizer, "optimizer", optimizer)
    if owner is None or not any(is_dtensor(p) for p in owner.parameters()):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(owner, inner, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, models: Mapping[str, torch.nn.Module],
                         state: dict[str, Any]) -> None:
    """The inverse of ``optimizer_state``: every process passes the whole state it wrote."""
    owner = _owner(optimizer, models)
    if owner is None or not any(is_dtensor(p) for p in owner.parameters()):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(owner, getattr(optimizer, "optimizer", optimizer), state,
                             options=StateDictOptions(full_state_dict=True))


@torch.no_grad()
def copy_whole(source: torch.nn.Module, target: torch.nn.Module) -> None:
    """Every parameter and buffer of ``source`` into ``target``, a module of the same structure
    with whole plain tensors (a collective under sharding). A weight tied under two names is
    gathered once."""
    params = dict(target.named_parameters(remove_duplicate=False))
    buffers = dict(target.named_buffers(remove_duplicate=False))
    missing = [n for n, _ in source.named_parameters(remove_duplicate=False) if n not in params]
    if missing:
        raise RuntimeError(f"whole copy: the copy has no parameter {missing[0]}")
    done: dict[int, torch.Tensor] = {}
    with gathered(source):
        for name, p in source.named_parameters(remove_duplicate=False):
            if id(p) not in done:
                done[id(p)] = whole_tensor(p)
            params[name].copy_(done[id(p)])
        for name, b in source.named_buffers(remove_duplicate=False):
            if name in buffers:
                buffers[name].copy_(b)


class WholeCopy:
    """A copy of a model with every weight whole on this process, for what runs outside the
    training step while the backend shards the model (sampling, evaluation, the saved model).

    Taken from the model before ``accelerator.prepare`` and kept on the meta device; ``fill``
    allocates it and copies the prepared model's current weights into it (a collective: every
    process calls it at the same point), ``release`` frees it again. Without sharding there is
    no copy: ``fill`` returns the prepared model's own module.
    """

    def __init__(self, model: torch.nn.Module, accelerator) -> None:
        self.accelerator = accelerator
        self.copy = None
        # Moving a module between devices gives each module its own new Parameter, so weights
        # tied under several names (embedding and output head) are tied again after each move.
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.ties = [group for group in names.values() if len(group) > 1]
        if shards_parameters(accelerator):
            self.copy = copy.deepcopy(model).to("meta")

    def fill(self, prepared: torch.nn.Module) -> torch.nn.Module:
        source = self.accelerator.unwrap_model(prepared)
        if self.copy is None:
            return source
        target = self.copy.to_empty(device=self.accelerator.device)
        for first, *others in self.ties:
            shared = target.get_parameter(first)
            for name in others:
                owner, _, leaf = name.rpartition(".")
                setattr(target.get_submodule(owner), leaf, shared)
        copy_whole(source, target)
        return target

    def release(self) -> None:
        if self.copy is not None:
            self.copy.to("meta")

    @contextlib.contextmanager
    def whole(self, prepared: torch.nn.Module) -> Iterator[torch.nn.Module]:
        model = self.fill(prepared)
        try:
            yield model
        finally:
            self.release()
