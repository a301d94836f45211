"""A short curriculum run learns to use its memory (the tiny preset's model and recipe, every stage shortened).

The micro preset checks that the pipeline runs; this checks that the recipe *learns*: after ~3 CPU-minutes of
training, the answer to a question about a held-out fact told one turn earlier is scored right far more often with
the memory carried than with a fresh memory. Forced choice (the reference answer with its value vs 5 rivals,
teacher forced) rather than greedy generation: so short a run does not yet phrase every answer, and the test is
about the memory, not fluency.
"""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from transformers_rxt import RxTForConversationalGeneration, load_rxt_tokenizer
from transformers_rxt.curriculum import preset_dir, run_curriculum
from transformers_rxt.data import build_memory_dialogues
from transformers_rxt.training import forced_choice_recall

# What the short run changes in the tiny preset: fewer steps and samples per stage; stage 4 only on fact ->
# question episodes (where the memory path is learned first; see benchmarks/RESULTS_memory.md).
SHORTER = {
    "stage1.yaml": {"max_steps": 100, "num_samples": 3200, "warmup_steps": 10, "save_strategy": "no"},
    "stage2.yaml": {"max_steps": 50, "num_samples": 1600, "warmup_steps": 5},
    "stage3.yaml": {"max_steps": 30, "num_samples": 480, "warmup_steps": 3},
    # 600 steps: the preset of 94bbf4b (tied LM head, more ages and counts in the training facts) starts to use its
    # memory later than the one before it: forced choice at 300 / 400 / 500 steps memory 0.27 / 0.40 / 0.35 against
    # reset 0.13 / 0.23 / 0.19 (below this test's bar); it passes at 600. (10f9009's preset: 0.69 / 0.15 at 300.)
    "stage4.yaml": {"max_steps": 600, "curriculum_turns": ["2"], "curriculum_samples": [9600],
                    "save_strategy": "no", "retention_dialogues": 0},
}


def short_tiny_preset(folder: Path) -> Path:
    tiny = preset_dir("tiny")
    folder.mkdir()
    shutil.copy(tiny / "model.yaml", folder / "model.yaml")
    shutil.copy(tiny / "stage0.yaml", folder / "stage0.yaml")
    for name, changes in SHORTER.items():
        config = yaml.safe_load((tiny / name).read_text())
        config.update(changes)
        (folder / name).write_text(yaml.safe_dump(config))
    return folder


@pytest.mark.slow
def test_a_short_curriculum_learns_to_recall_from_memory(tmp_path):
    threads = torch.get_num_threads()
    try:
        run_curriculum(str(short_tiny_preset(tmp_path / "preset")), tmp_path / "out", "0-4", log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    model_dir = tmp_path / "out" / "stage4"
    model = RxTForConversationalGeneration.from_pretrained(model_dir)
    tokenizer = load_rxt_tokenizer(model_dir)
    dialogues = build_memory_dialogues(48, 1, seed=7, split="heldout", num_turns=2, fact_rate=1.0, probe_rate=1.0)
    result = forced_choice_recall(model, tokenizer, dialogues)
    assert result["n"] == 48
    # One binomial std at n=48 is ~0.06-0.07 (chance 0.167).
    assert result["memory"] >= result["reset"] + 0.2, result
    assert result["memory"] >= 2 * result["chance"], result
