"""A pipeline command under accelerate's FSDP2 on CPU processes (gloo): the launch target of
the FSDP tests.

accelerate (1.15) takes an FSDP config on GPU processes only: on CPUs it sets up gloo and
trains with plain DDP (``AcceleratorState`` picks FSDP only for GPU-family distributed types),
which the pipeline refuses. This target switches accelerate's state to FSDP once the gloo
group is up, so that accelerate's own FSDP2 code runs on CPU: ``fully_shard`` per decoder
layer, for the embedding/norm/head unit and the root, gradient clipping over DTensors, the
optimizer moved onto the shards. Each prepared model is reported with how it is sharded, so the
tests can check it really is. ``ppo`` runs with the scripted rollouts of ``scripted_ppo``.

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml \\
        --num_processes 2 --mixed_precision no -m tests.integration.fsdp_cpu rm key=value ...
"""

from __future__ import annotations

import sys

import accelerate
from accelerate import FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor, Shard

from pipeline import cli, runtime
from stages import ppo
from tests.integration.scripted_ppo import scripted_generate


class FSDPOnCPU(accelerate.Accelerator):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The plugin as accelerate builds it from the launcher's FSDP_* variables.
        AcceleratorState._shared_state["fsdp_plugin"] = FullyShardedDataParallelPlugin()
        # A later AcceleratorState() copies PartialState's type back: both are set.
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP

    def prepare(self, *args, **kwargs):
        out = super().prepare(*args, **kwargs)
        for obj in out if isinstance(out, (tuple, list)) else (out,):
            params = list(getattr(obj, "parameters", list)())
            if params and self.is_fsdp2:
                sharded = sum(isinstance(p, DTensor) and isinstance(p.placements[0], Shard)
                              for p in params)
                print(f"fsdp2 prepared {type(obj).__name__}: {sharded} of {len(params)} "
                      f"parameters are shards over {self.num_processes} processes", flush=True)
        return out


if __name__ == "__main__":
    runtime.Accelerator = FSDPOnCPU
    if sys.argv[1] == "ppo":
        ppo.generate = scripted_generate
    sys.exit(cli.main(sys.argv[1:]))
