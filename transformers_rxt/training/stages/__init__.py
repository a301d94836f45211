"""The curriculum's stage entry points, one module per stage, each with ``main(argv: list[str] | None = None)``:

- :mod:`.stage0_tokenizer` (tokenizer), :mod:`.stage1_joint_pretrain` (joint LM pre-training),
  :mod:`.stage2_joint_sft` (joint interaction SFT), :mod:`.stage3_memory_attention` (memory-attention
  pre-training), :mod:`.stage4_memory_aware` (supervised memory-aware training), :mod:`.stage5_impo`
  (IMPO, or DMPO with ``--algorithm dmpo``); :mod:`.common` holds what they share.

``argv`` is ``["--config", "<preset>/stageN.yaml", ...overrides]`` (default: the process's arguments).
``rxt train`` calls ``main`` in its own process; the same code runs as ``python -m
transformers_rxt.training.stages.stage4_memory_aware --config ...`` and, through the thin scripts in the
repository's ``trainers/`` folder, as ``accelerate launch trainers/stage4_memory_aware.py --config ...``.
Importing this package imports nothing else: each stage imports torch, transformers and TRL when it runs.
"""
