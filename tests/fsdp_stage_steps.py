"""Stages 1 and 4 under torch's FSDP2 (``fully_shard``) on CPU with gloo, as a worker for
tests/test_training_distributed.py; run with ``python -m torch.distributed.run --nproc-per-node N``.

    fsdp_stage_steps.py OUT full      2 optimizer steps, a sharded checkpoint (model + optimizer, torch's
                                      distributed checkpoint) after the first, the final weights as HF directories
    fsdp_stage_steps.py OUT resume    a model built from another seed, the checkpoint of OUT's ``full`` run loaded,
                                      then the second step: the same final weights are expected

The model is sharded by accelerate's own FSDP2 code (``fsdp2_prepare_model``) with the plugin of the shipped
trainers/configs/accelerate/fsdp2.yaml, as ``accelerate launch`` does on GPUs. Why not ``Trainer`` with that
plugin: accelerate turns FSDP on only for GPU-type process groups (see README, "Stage models and multi-GPU"), so
the training loop, the sharded checkpoint (torch's distributed checkpoint, what accelerate saves for FSDP) and
the full-state-dict output are written out here.

A global batch is 4 rows, 4 // N per process. Stage 4 passes the step's answer-token counts per turn
(``loss_item_counts`` of the whole batch) as ``RxTStageTrainer`` does, so N = 1 and N = 2 give the same update;
plain SGD with momentum keeps the update linear in the gradient and still has optimizer state to checkpoint.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from types import SimpleNamespace

import yaml
from accelerate import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ddp_stage4_step import episode  # noqa: E402
from rxt_factories import tiny_config  # noqa: E402
from transformers_rxt import RxTForConversationalGeneration  # noqa: E402
from transformers_rxt.data import DataCollatorForRxTEpisodes, DataCollatorForRxTMLM  # noqa: E402
from transformers_rxt.training import (  # noqa: E402
    JointLMConfig,
    MemoryAwareConfig,
    RxTForJointLMTraining,
    RxTForMemoryAwareTraining,
)

STEPS, ROWS = 2, 4
CONFIG = Path(__file__).resolve().parents[1] / "trainers" / "configs" / "accelerate" / "fsdp2.yaml"


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """The FSDP plugin ``accelerate launch --config_file fsdp2.yaml`` builds (from its fsdp_config)."""
    cfg = yaml.safe_load(CONFIG.read_text())["fsdp_config"]
    return FullyShardedDataParallelPlugin(
        fsdp_version=cfg["fsdp_version"],
        auto_wrap_policy=cfg["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=cfg.get("fsdp_transformer_layer_cls_to_wrap"),
        reshard_after_forward=cfg["fsdp_reshard_after_forward"],
        state_dict_type=cfg["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=cfg["fsdp_cpu_ram_efficient_loading"],
        cpu_offload=cfg["fsdp_offload_params"],
        activation_checkpointing=cfg["fsdp_activation_checkpointing"],
    )


def shard(model, rank: int):
    """accelerate's FSDP2 preparation of ``model`` (its ``Accelerator`` reduced to what that code reads)."""
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp_plugin()), mixed_precision="no",
                                  is_main_process=rank == 0, device=torch.device("cpu"), torch_device_mesh=None)
    return fsdp2_prepare_model(accelerator, model)


def build(stage: int, seed: int):
    torch.manual_seed(seed)
    config = tiny_config(stm_init_type="learned", seq_len=64)
    if stage == 1:
        args = JointLMConfig(output_dir="unused", use_cpu=True, report_to="none", memory_noise=0.1)
        return RxTForJointLMTraining(config, args).train()
    args = MemoryAwareConfig(output_dir="unused", use_cpu=True, report_to="none", backprop_turns=0)
    return RxTForMemoryAwareTraining.from_rxt(RxTForConversationalGeneration(config), args).train()


def global_batch(stage: int, step: int) -> dict:
    """The step's 4 rows (the same on every process)."""
    if stage == 4:
        # the same number of turns in every episode: see the README on FSDP (every process must run as many turns)
        episodes = [episode(100 * step + i, 3) for i in range(ROWS)]
        return DataCollatorForRxTEpisodes(pad_token_id=0)(episodes)
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(11, 96, (ROWS, 24), generator=g)
    mask = torch.ones_like(ids)
    for row in range(ROWS):  # rows of different lengths, right-padded
        mask[row, 24 - 3 * row:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    masker = DataCollatorForRxTMLM(mask_token_id=4, pad_token_id=0, vocab_size=96, generator=g)
    masked, mlm_labels = masker.mask_tokens(ids, mask)
    return {"encoder_input_ids": masked, "encoder_labels": mlm_labels, "decoder_input_ids": ids,
            "decoder_labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask}


def train_step(model, optimizer, stage: int, step: int, rank: int, world: int) -> None:
    batch = global_batch(stage, step)
    per = ROWS // world
    local = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
    generator = torch.Generator().manual_seed(1000 * step + rank)
    if stage == 4:
        counts = model.loss_item_counts(batch)  # the whole step's, as the trainer passes them
        loss = model(**local, num_items_in_batch=counts, generator=generator).loss * world  # FSDP averages grads
    else:
        loss = model(**local, generator=generator).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def checkpoint_state(model, optimizer) -> dict:
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def run(stage: int, out: Path, mode: str, rank: int, world: int) -> None:
    model = shard(build(stage, seed=0 if mode == "full" else 1), rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    checkpoint = out / f"stage{stage}-world{world}-checkpoint-1"
    first = 0
    if mode == "resume":
        state = checkpoint_state(model, optimizer)
        # parameters the stage never uses (stage 1: the memory attention) have no optimizer state in the checkpoint
        dcp.load(state, checkpoint_id=str(checkpoint), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        first = 1
    for step in range(first, STEPS):
        train_step(model, optimizer, stage, step, rank, world)
        if mode == "full" and step == 0:
            dcp.save(checkpoint_state(model, optimizer), checkpoint_id=str(checkpoint))
    # the output as Trainer writes it under FSDP's FULL_STATE_DICT: gathered on rank 0, saved with save_pretrained
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(out / f"stage{stage}-{mode}-world{world}", state_dict=full)


def main(out: str, mode: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for stage in (1, 4):
        run(stage, Path(out), mode, rank, world)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:])
