"""Stage 5 from Python: IMPO (memory RL) and DMPO (memory-aware DPO) on a stage-4 model.

    python examples/impo_dmpo.py outputs/main/stage4 [--steps 20]

Both start from the same stage-4 model, train briefly on synthetic 3-turn episodes (a fact, then questions
about it), and report held-out recall before and after. The stage-5 entry point
(transformers_rxt.training.stages.stage5_impo: `rxt train`, or trainers/stage5_impo.py under `accelerate launch`)
does the same with YAML presets.
"""

import argparse

from transformers_rxt import load_rxt_tokenizer
from transformers_rxt.data import build_memory_dialogues, fact_recall_reward, tokenize_mrl_dataset
from transformers_rxt.training import (
    DMPOConfig,
    DMPOTrainer,
    IMPOConfig,
    IMPOTrainer,
    evaluate_heldout_retention,
    make_dmpo_records,
    tokenize_dmpo_dataset,
)


def recall(model, tokenizer) -> float:
    result = evaluate_heldout_retention(model.eval(), tokenizer, 64, max_distance=2, seed=7, compute_perplexity=False)
    return result["memory"]["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage4", help="a stage-4 (memory-aware) RxT model directory")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="outputs/example_stage5")
    args = parser.parse_args()
    tokenizer = load_rxt_tokenizer(args.stage4)
    episodes = build_memory_dialogues(512, max_distance=2, seed=0)  # 3-turn episodes: 1 saved + 2 follow-ups

    # IMPO, a trl.GRPOTrainer: rollouts with the model's own generate() and one STMCache per episode, TRL's
    # clipped loss with a group baseline (4 samples per episode; TRL counts completions: 8 = 2 episodes x 4),
    # the fact-recall reward as a TRL reward function (here alone; default: TensorBLEU + embedding cosine).
    impo_args = IMPOConfig(output_dir=f"{args.output}/impo", max_steps=args.steps, per_device_train_batch_size=8,
                           curriculum_steps=2, num_generations=4, advantage_estimator="group",
                           learning_rate=5e-5, unfreeze_schedule="0:fetch", use_cpu=True, report_to="none",
                           logging_steps=5, save_strategy="no")
    impo = IMPOTrainer(args.stage4, reward_funcs=[fact_recall_reward], args=impo_args, processing_class=tokenizer,
                       train_dataset=tokenize_mrl_dataset(episodes, tokenizer, 64, truncation=True))
    before = recall(impo.model.as_rxt(), tokenizer)
    impo.train()
    print(f"IMPO: held-out recall {before:.3f} -> {recall(impo.model.as_rxt(), tokenizer):.3f}")

    # DMPO, a trl.DPOTrainer: per turn, TRL's DPO loss between the accepted and a rejected answer, both scored on
    # the memory built from the ACCEPTED history; the memory is updated with the accepted interaction only after
    # scoring. loss_type ["sigmoid", "sft"] is TRL's RPO.
    dmpo_args = DMPOConfig(output_dir=f"{args.output}/dmpo", max_steps=args.steps, per_device_train_batch_size=8,
                           beta=0.1, loss_type=["sigmoid", "sft"], learning_rate=5e-5, use_cpu=True,
                           report_to="none", logging_steps=5, save_strategy="no")
    preferences = tokenize_dmpo_dataset(make_dmpo_records(episodes), tokenizer, 64)
    dmpo = DMPOTrainer(args.stage4, args=dmpo_args, train_dataset=preferences, processing_class=tokenizer)
    dmpo.train()
    print(f"DMPO: held-out recall {before:.3f} -> {recall(dmpo.model.as_rxt(), tokenizer):.3f}")


if __name__ == "__main__":
    main()
