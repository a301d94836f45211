"""Stage 5: memory reinforcement learning (IMPO), or DMPO with --algorithm dmpo.

    python trainers/stage5_impo.py --config trainers/configs/tiny/stage5.yaml
    python trainers/stage5_impo.py --config trainers/configs/tiny/stage5.yaml --algorithm dmpo
    accelerate launch --multi_gpu --num_processes 2 trainers/stage5_impo.py \
        --config trainers/configs/tiny/stage5.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage5_impo.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage5_impo import main

if __name__ == "__main__":
    main()
