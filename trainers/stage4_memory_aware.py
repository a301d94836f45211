"""Stage 4: supervised memory-aware training.

    python trainers/stage4_memory_aware.py --config trainers/configs/tiny/stage4.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage4_memory_aware.py \
        --config trainers/configs/tiny/stage4.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage4_memory_aware.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage4_memory_aware import main

if __name__ == "__main__":
    main()
