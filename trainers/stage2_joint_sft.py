"""Stage 2: joint interaction SFT.

    python trainers/stage2_joint_sft.py --config trainers/configs/tiny/stage2.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage2_joint_sft.py \
        --config trainers/configs/tiny/stage2.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage2_joint_sft.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage2_joint_sft import main

if __name__ == "__main__":
    main()
