"""Stage 3: self-supervised memory-attention pre-training.

    python trainers/stage3_memory_attention.py --config trainers/configs/tiny/stage3.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage3_memory_attention.py \
        --config trainers/configs/tiny/stage3.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage3_memory_attention.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage3_memory_attention import main

if __name__ == "__main__":
    main()
