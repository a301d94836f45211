"""One stage-4 optimizer step on a fixed global batch of 4 episodes, as a worker for
tests/test_training_distributed.py: run with ``python`` (one process, the whole batch) or under
``accelerate launch --num_processes 2`` (two rows per process); the main process saves the parameters after
the step and the logged loss to ``argv[1]``.

The episodes differ in turn count and answer length, so each process sees a different number of answer tokens
per turn and a different number of turns: the update is that of one process only if the stage loss is
normalised over the global batch. Plain SGD without clipping or weight decay keeps the update proportional to
the gradient (AdamW's first step is about lr * sign(grad) and would hide a wrongly scaled gradient).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rxt_factories import tiny_config  # noqa: E402
from transformers_rxt import RxTForConversationalGeneration  # noqa: E402
from transformers_rxt.training import MemoryAwareConfig, MemoryAwareTrainer  # noqa: E402

BOS, EOS, QUERY, ANSWER = 2, 3, 5, 6


def interaction(g: torch.Generator) -> tuple[list[int], list[int]]:
    """``[BOS][Q] q [A] a [EOS]`` with random lengths; labels on the answer side only."""
    q, a = (torch.randint(11, 96, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(2))
    return [BOS, QUERY, *q, ANSWER, *a, EOS], [-100] * (len(q) + 3) + [*a, EOS]


def episode(seed: int, turns: int) -> dict:
    """``turns`` random interactions, and a review question before every other turn boundary from 1 on."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = zip(*(interaction(g) for _ in range(turns)))
    review_ids, review_labels = [[] for _ in range(turns + 1)], [[] for _ in range(turns + 1)]
    for k in range(1 + seed % 2, turns + 1, 2):
        review_ids[k], review_labels[k] = interaction(g)
    return {"turn_input_ids": list(ids), "turn_labels": list(labels),
            "review_input_ids": review_ids, "review_labels": review_labels}


# rows 0-1 go to process 0, rows 2-3 to process 1 (sequential sampling): 3+2 turns vs 2+4 turns
EPISODES = [episode(1, 3), episode(2, 2), episode(3, 2), episode(4, 4)]


# a FIFO memory (2 fresh slots per write), for the write token loss
FIFO = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
            use_tanh_residual_gate=False, fifo_write_slots=2)


def one_step(output_dir: str, per_device: int, accumulation: int = 1, gradient_checkpointing: bool = False,
             callbacks: list | None = None, review_loss_weight: float = 0.0,
             write_token_loss_weight: float = 0.0) -> tuple[dict, MemoryAwareTrainer]:
    """The initial parameters and the trainer after one SGD step on :data:`EPISODES` (their review questions
    trained with ``review_loss_weight`` > 0; with ``write_token_loss_weight`` > 0 the model has a FIFO memory
    and its writes are scored)."""
    torch.manual_seed(0)
    memory = FIFO if write_token_loss_weight > 0 else None
    model = RxTForConversationalGeneration(tiny_config(memory=memory, stm_init_type="learned", seq_len=64)).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = MemoryAwareConfig(
        output_dir=output_dir, per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation,
        max_steps=1, optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=0.0, train_sampling_strategy="sequential", backprop_turns=0, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
        gradient_checkpointing=gradient_checkpointing, review_loss_weight=review_loss_weight,
        write_token_loss_weight=write_token_loss_weight,
    )
    trainer = MemoryAwareTrainer(model, args, train_dataset=EPISODES, callbacks=callbacks)
    trainer.train()
    return initial, trainer


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # every part of the stage loss: answers, reviews and the write token loss, each normalised over the step
    initial, trainer = one_step(str(Path(out).parent / f"run-{world}"), len(EPISODES) // world,
                                review_loss_weight=0.5, write_token_loss_weight=0.3)
    if trainer.is_world_process_zero():
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)  # gathered over processes
        torch.save({"initial": initial, "params": params, "loss": loss}, out)


if __name__ == "__main__":
    main(sys.argv[1])
