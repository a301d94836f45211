"""Stage 0: train the RxT tokenizer.

    python trainers/stage0_tokenizer.py --config trainers/configs/tiny/stage0.yaml

A thin launcher for
:func:`transformers_rxt.training.stages.stage0_tokenizer.main`
(``rxt train`` calls it in its own process). Options follow the config (``--help`` lists them).
"""

from transformers_rxt.training.stages.stage0_tokenizer import main

if __name__ == "__main__":
    main()
