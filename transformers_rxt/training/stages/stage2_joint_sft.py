"""Stage 2: joint interaction SFT: stage 1's algorithm on ``[BOS][Q]query[A]answer[EOS]`` interactions
(only the answer side is trained).

    python trainers/stage2_joint_sft.py --config trainers/configs/tiny/stage2.yaml
    accelerate launch --multi_gpu --num_processes 2 trainers/stage2_joint_sft.py --config ...

Loads ``init_from`` (the stage-1 output: model, MLM head, tokenizer) and writes the same kind of directory.
Data: ``synthetic`` SFT pairs, or a local/Hub dataset with ``query``/``answer`` columns (also the combined
``[Q]..[A]..`` text form and chat ``messages``).
"""

from __future__ import annotations

from .stage1_joint_pretrain import run


def main(argv: list[str] | None = None) -> None:
    """Stage 2 with ``argv`` (default: the process's arguments), e.g. ``["--config", "stage2.yaml"]``."""
    run("stage2", "sft", argv)


if __name__ == "__main__":
    main()
