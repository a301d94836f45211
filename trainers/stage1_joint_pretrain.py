"""Stage 1: joint LM pre-training.

    python trainers/stage1_joint_pretrain.py --config trainers/configs/tiny/stage1.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage1_joint_pretrain.py \
        --config trainers/configs/tiny/stage1.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage1_joint_pretrain.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage1_joint_pretrain import main

if __name__ == "__main__":
    main()
