"""Sharded weights: where a read falls back or gathers, whole copies, checkpoints, refusals.

FSDP2 cases use torch's real ``fully_shard`` in a one-process gloo group (its parameters are
DTensors, whole only inside the hooks of the sharded modules' forwards). DeepSpeed is not
installed and needs a GPU, so ZeRO-3 cases use the placeholder it leaves in a partitioned
parameter (an empty tensor, tagged with a ``ds_id``) and a stand-in for its
``GatheredParameters``; what they check is that the pipeline asks for the gather and reads the
gathered values, not DeepSpeed itself.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import yaml
from accelerate.utils import DistributedType
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline import sharding
from pipeline.errors import PipelineError
from pipeline.models import output_logits
from pipeline.text import generate
from pipeline.training import load_checkpoint, save_checkpoint
from stages import ops
from stages.scoring import PolicyModel

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]


def tiny_llama(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=tied,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def batch():
    ids = torch.tensor([[0, 0, 5, 9, 12, 7, 3], [4, 8, 15, 16, 23, 42, 1]])
    mask = (ids != 0).long()
    scored = torch.zeros_like(mask)
    scored[:, 4:] = 1
    return ids, mask, scored


class Stub:
    """The parts of an Accelerator the sharding helpers and checkpoints read."""

    def __init__(self, distributed_type=DistributedType.NO, zero_stage: int = 0):
        self.distributed_type = distributed_type
        plugin = types.SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
        self.state = types.SimpleNamespace(deepspeed_plugin=plugin, fsdp_plugin=None)
        self.device = torch.device("cpu")
        self.num_processes = 1
        self.process_index = 0
        self.is_main_process = True
        self.saved, self.loaded = [], []

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        pass

    def save_state(self, path: str):
        Path(path).mkdir(parents=True)
        (Path(path) / "engine.pt").write_text("engine state")
        self.saved.append(path)

    def load_state(self, path: str):
        self.loaded.append(path)


# ---------------------------------------------------------------------------------------------
# Launch setups the pipeline refuses, and the shipped accelerate configs
# ---------------------------------------------------------------------------------------------


def test_backend_problems_name_each_setup_the_pipeline_cannot_run() -> None:
    fsdp, ds = DistributedType.FSDP, DistributedType.DEEPSPEED
    assert sharding.backend_problems(DistributedType.MULTI_CPU, {}) == []
    assert sharding.backend_problems(fsdp, {"ACCELERATE_USE_FSDP": "true"}, fsdp_version=2) == []
    assert sharding.backend_problems(ds, {"ACCELERATE_USE_DEEPSPEED": "true"}) == []
    on_cpu = sharding.backend_problems(DistributedType.MULTI_CPU, {"ACCELERATE_USE_FSDP": "true"})
    assert len(on_cpu) == 1 and "accelerate runs FSDP on GPUs only" in on_cpu[0]
    ds_cpu = sharding.backend_problems(DistributedType.NO, {"ACCELERATE_USE_DEEPSPEED": "True"})
    assert len(ds_cpu) == 1 and "runs DeepSpeed on GPUs only" in ds_cpu[0]
    assert "fsdp_version: 1 is not supported" in sharding.backend_problems(
        fsdp, {}, fsdp_version=1)[0]
    assert "fsdp_cpu_ram_efficient_loading: true" in sharding.backend_problems(
        fsdp, {}, fsdp_version=2, fsdp_ram_efficient_loading=True)[0]
    assert "zero3_init_flag: true" in sharding.backend_problems(ds, {}, zero3_init=True)[0]


def test_the_fsdp_config_as_accelerate_launches_it_passes_the_checks(monkeypatch) -> None:
    """The environment accelerate's launcher derives from configs/accelerate/fsdp.yaml, read
    back by accelerate's own FSDP plugin: FSDP2, no empty models on the other processes."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(REPO / "configs/accelerate/fsdp.yaml"), "train.py"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    for key, value in env.items():
        if key.startswith(("ACCELERATE_USE_FSDP", "FSDP_")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert plugin.fsdp_version == 2 and not plugin.cpu_ram_efficient_loading
    assert sharding.backend_problems(DistributedType.FSDP, env, plugin.fsdp_version,
                                     plugin.cpu_ram_efficient_loading) == []


@pytest.mark.parametrize("name, stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_the_deepspeed_configs_parse_into_accelerates_plugin(name: str, stage: int) -> None:
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    path = REPO / "configs" / "accelerate" / f"{name}.yaml"
    cluster = load_config_from_file(str(path))
    assert cluster.distributed_type == DistributedType.DEEPSPEED
    ds = cluster.deepspeed_config
    plugin = DeepSpeedPlugin(hf_ds_config=str(REPO / ds["deepspeed_config_file"]),
                             zero3_init_flag=ds.get("zero3_init_flag", False))
    assert plugin.zero_stage == stage and not plugin.zero3_init_flag
    # The batch sizes, clipping and precision are "auto": accelerate fills them when preparing.
    raw = json.loads((REPO / ds["deepspeed_config_file"]).read_text())
    assert raw["train_micro_batch_size_per_gpu"] == raw["gradient_clipping"] == "auto"
    assert sharding.backend_problems(DistributedType.DEEPSPEED,
                                     {"ACCELERATE_USE_DEEPSPEED": "true"},
                                     zero3_init=plugin.zero3_init_flag) == []


def test_every_shipped_accelerate_config_loads() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    paths = sorted((REPO / "configs" / "accelerate").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"cpu_2proc", "fsdp", "deepspeed_zero2", "deepspeed_zero3",
                                       "gpu_ddp", "gpu_single"}
    for path in paths:
        assert load_config_from_file(str(path)).num_processes == yaml.safe_load(
            path.read_text())["num_processes"], path


def test_ppo_refuses_deepspeed_before_touching_the_stage(monkeypatch, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from stages import ppo
    from tests.conftest import tiny_override_list

    monkeypatch.setattr(ppo, "make_accelerator",
                        lambda cfg, precision: Stub(DistributedType.DEEPSPEED, zero_stage=2))
    cfg = load_config(None, tiny_override_list(tmp_path / "runs"))
    with pytest.raises(PipelineError, match=r"^ppo: DeepSpeed is not supported for PPO \(it "
                                            r"trains two models"):
        ppo.run(cfg)
    assert not (tmp_path / "runs" / "tiny" / "ppo").exists()


# ---------------------------------------------------------------------------------------------
# ZeRO-3: empty placeholders
# ---------------------------------------------------------------------------------------------


def partition(module: torch.nn.Module) -> None:
    """Leave ZeRO-3's placeholder in each parameter: an empty tensor, the values elsewhere."""
    for i, p in enumerate(module.parameters()):
        p.ds_id = i
        p.ds_values = p.data.clone()
        p.data = torch.empty(0, dtype=p.dtype)


def with_hooks(module: torch.nn.Module) -> None:
    """ZeRO-3's hooks: the module's parameters whole during its own forward only."""
    def fill(mod, args):
        for p in mod.parameters(recurse=False):
            p.data = p.ds_values

    def empty(mod, args, out):
        for p in mod.parameters(recurse=False):
            p.data = torch.empty(0, dtype=p.dtype)

    module.register_forward_pre_hook(fill)
    module.register_forward_hook(empty)


@pytest.fixture
def fake_deepspeed(monkeypatch):
    """``deepspeed.zero.GatheredParameters``: whole values inside, placeholders after; with a
    modifier rank, that rank's writes are kept."""
    calls = []

    class GatheredParameters:
        def __init__(self, params, modifier_rank=None):
            self.params = list(params)
            calls.append((len(self.params), modifier_rank))
            self.modifier_rank = modifier_rank

        def __enter__(self):
            for p in self.params:
                p.data = p.ds_values.clone()

        def __exit__(self, *exc):
            for p in self.params:
                if self.modifier_rank is not None:
                    p.ds_values = p.data.clone()
                p.data = torch.empty(0, dtype=p.dtype)

    module = types.ModuleType("deepspeed")
    module.zero = types.SimpleNamespace(GatheredParameters=GatheredParameters)
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    return calls


def test_a_placeholder_head_is_read_through_its_own_forward(monkeypatch) -> None:
    """The fused log-prob op would read the head's weight directly: with a placeholder there
    the policy uses the head's forward (where the backend's hooks fill it), same outputs."""
    model = tiny_llama(tied=False)
    ids, mask, scored = batch()
    with torch.no_grad():
        want, want_ent = PolicyModel(model)(ids, mask, scored, 0.7, entropy="detached")
        hidden = model.model(input_ids=ids).last_hidden_state[:, -1]
        want_logits = output_logits(model, hidden)
    partition(model.lm_head)
    with_hooks(model.lm_head)
    assert sharding.is_partial(model.lm_head.weight)

    def fused(*args, **kwargs):
        raise AssertionError("the fused op read a placeholder weight")

    monkeypatch.setattr(ops, "logprobs_from_hidden", fused)
    with torch.no_grad():
        got, got_ent = PolicyModel(model)(ids, mask, scored, 0.7, entropy="detached")
        got_logits = output_logits(model, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_ent, want_ent)
    torch.testing.assert_close(got_logits, want_logits)
    assert model.lm_head.weight.numel() == 0  # the hooks emptied it again


def test_generate_refuses_placeholder_weights() -> None:
    model = tiny_llama()
    partition(model)
    tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
    with pytest.raises(RuntimeError, match="generate\\(\\) needs whole weights"):
        generate(model, tok, [[5, 6]], max_new_tokens=2, temperature=0.0)


def test_zero3_whole_copy_and_checkpoint_state_are_gathered(fake_deepspeed) -> None:
    model = tiny_llama(tied=False)
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask, _ = batch()
    with torch.no_grad():
        want_logits = model(input_ids=ids, attention_mask=mask).logits
    accelerator = Stub(DistributedType.DEEPSPEED, zero_stage=3)
    whole = sharding.WholeCopy(model, accelerator)  # taken before prepare, as the stages do
    partition(model)

    state = sharding.whole_state(model)
    assert fake_deepspeed[-1] == (len(want), None)
    assert state.keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(state[name], value)
    assert all(p.numel() == 0 for p in model.parameters())  # partitioned again

    with whole.whole(model) as copy_, torch.no_grad():
        assert not any(sharding.is_partial(p) for p in copy_.parameters())
        torch.testing.assert_close(copy_(input_ids=ids, attention_mask=mask).logits,
                                   want_logits)
    assert all(p.is_meta for p in whole.copy.parameters())  # released

    doubled = {n: 2 * v for n, v in want.items()}
    sharding.load_whole_state(model, doubled)
    assert fake_deepspeed[-1] == (len(want), 0)  # written by the main process, kept by all
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.ds_values, doubled[name])


def test_deepspeed_checkpoints_go_through_the_engine(tmp_path: Path) -> None:
    """Under DeepSpeed the engine's own checkpoint is saved inside the atomic step folder and
    loaded back; a checkpoint from another backend is refused in one line."""
    accelerator = Stub(DistributedType.DEEPSPEED, zero_stage=2)
    save_checkpoint(tmp_path, 3, accelerator, models={"policy": torch.nn.Linear(2, 2)},
                    optimizers={}, state={"cursor": 7})
    step = tmp_path / "step-0000003"
    assert accelerator.saved == [str(tmp_path / ".step-0000003.tmp" / "deepspeed")]
    assert (step / "deepspeed" / "engine.pt").is_file()
    assert not list(step.glob("*.safetensors")) and not (step / "optim.pt").exists()
    assert json.loads((step / "state.json").read_text())["backend"] == "deepspeed"
    state = load_checkpoint(step, accelerator, models={}, optimizers={})
    assert accelerator.loaded == [str(step / "deepspeed")] and state["cursor"] == 7

    with pytest.raises(PipelineError, match=r"step-0000003: written under deepspeed and this run "
                                            r"is under replicated; resume it with the"):
        load_checkpoint(step, Stub(), models={}, optimizers={})


# ---------------------------------------------------------------------------------------------
# FSDP2: DTensor shards, with torch's fully_shard in a one-process group
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def process_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def fully_sharded(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    return fully_shard(model)


def test_fsdp2_shards_gather_into_a_whole_copy_and_checkpoint_state(process_group) -> None:
    model = tiny_llama(tied=True)
    reference = copy.deepcopy(model)
    accelerator = Stub(DistributedType.FSDP)
    whole = sharding.WholeCopy(model, accelerator)
    fully_sharded(model)
    assert all(sharding.is_dtensor(p) for p in model.parameters())
    ids, mask, _ = batch()

    with whole.whole(model) as copy_, torch.no_grad():
        assert copy_.lm_head.weight is copy_.model.embed_tokens.weight  # tied again
        torch.testing.assert_close(copy_.model.rotary_emb.inv_freq,
                                   reference.model.rotary_emb.inv_freq)
        torch.testing.assert_close(copy_(input_ids=ids, attention_mask=mask).logits,
                                   reference(input_ids=ids, attention_mask=mask).logits)
        tok = types.SimpleNamespace(pad_token_id=0, eos_token_id=1)
        prompts = [[5, 9, 12], [4, 8]]
        assert generate(copy_, tok, prompts, max_new_tokens=5, temperature=0.0) == generate(
            reference, tok, prompts, max_new_tokens=5, temperature=0.0)
    assert all(p.is_meta for p in whole.copy.parameters())

    # A training step on the shards; the checkpoint's whole optimizer state is keyed by name.
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(input_ids=ids, attention_mask=mask).logits.pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    state = {n: t.clone() for n, t in sharding.whole_state(model).items()}
    assert not any(sharding.is_dtensor(t) for t in state.values())
    saved = sharding.optimizer_state(optimizer, {"m": model})
    assert "model.embed_tokens.weight" in saved["state"]
    with whole.whole(model) as copy_:
        for name, value in state.items():
            torch.testing.assert_close(copy_.get_parameter(name), value)

    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    sharding.load_optimizer_state(fresh, {"m": model}, saved)
    for p in model.parameters():
        torch.testing.assert_close(fresh.state[p]["exp_avg"].to_local(),
                                   optimizer.state[p]["exp_avg"].to_local())
    sharding.load_whole_state(model, {n: v + 1 for n, v in state.items()})
    for name, value in sharding.whole_state(model).items():
        torch.testing.assert_close(value, state[name] + 1)


def test_a_sharded_head_is_read_through_its_own_forward(process_group, monkeypatch) -> None:
    """An FSDP2 head outside the prepared model's forward: its weight is a DTensor, so the
    policy runs the head's forward, whose hooks all-gather it."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_llama(tied=False)
    ids, mask, scored = batch()
    with torch.no_grad():
        want, _ = PolicyModel(model)(ids, mask, scored, 1.0)
    fully_shard(model.lm_head)
    assert sharding.is_partial(model.lm_head.weight)
    monkeypatch.setattr(ops, "logprobs_from_hidden", None)  # the fused op is not called
    with torch.no_grad():
        got, _ = PolicyModel(model)(ids, mask, scored, 1.0)
    torch.testing.assert_close(got, want)
