"""Worker of tests/test_training_distributed.py: IMPO (a trl.GRPOTrainer) and DMPO (a trl.DPOTrainer), two steps
each on a tiny model under `accelerate launch` (2 CPU processes, gloo), checkpoints at every step; ``resume``
runs them again from checkpoint-1 of the ``full`` run. Writes OUT/{impo,dmpo}-{full,resume}/final."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rxt_factories import story_tokenizer, tiny_model  # noqa: E402
from test_impo import VOCAB, dmpo_dataset, episodes  # noqa: E402

from transformers_rxt.training import DMPOConfig, DMPOTrainer, IMPOConfig, IMPOTrainer  # noqa: E402


def main(out: Path, mode: str) -> None:
    tok = story_tokenizer(VOCAB)
    common = dict(max_steps=2, save_strategy="steps", save_steps=1, use_cpu=True, report_to="none", logging_steps=1,
                  seed=0, disable_tqdm=True, learning_rate=1e-3)
    for name in ("impo", "dmpo"):
        resume = str(out / f"{name}-full" / "checkpoint-1") if mode == "resume" else None
        output = out / f"{name}-{mode}"
        if name == "impo":  # 2 episodes x 2 samples per process and step, TRL's group baseline, reference KL
            args = IMPOConfig(output_dir=str(output), per_device_train_batch_size=4, num_generations=2, beta=0.05,
                              curriculum_steps=2, max_completion_length=6, advantage_estimator="group", **common)
            trainer = IMPOTrainer(tiny_model(vocab=VOCAB), args=args, train_dataset=episodes(16), processing_class=tok)
        else:
            args = DMPOConfig(output_dir=str(output), per_device_train_batch_size=2, beta=0.5, **common)
            trainer = DMPOTrainer(tiny_model(vocab=VOCAB), args=args, train_dataset=dmpo_dataset(8),
                                  processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(str(output / "final"))
        assert trainer.accelerator.num_processes == 2 and trainer.state.global_step == 2


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
