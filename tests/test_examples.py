"""The runnable examples run (offline, CPU, shrunk where they take a size option)."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES, require_parity_fixture

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("script, args", [
    ("rxlm_checkpoint_demo.py", [str(FIXTURES / "rxt-alpha-tiny")]),
    ("tensorbleu_reward.py", []),
    ("lora_finetune.py", ["--steps", "2"]),
    ("sqa_llama_pretraining.py", ["--max-steps", "2", "--output-dir", "{tmp}/sqa"]),
])
def test_example_runs(script, args, tmp_path, monkeypatch, capsys):
    if script == "rxlm_checkpoint_demo.py":
        require_parity_fixture("rxt-alpha-tiny")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, *(a.format(tmp=tmp_path) for a in args)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(EXAMPLES / script), run_name="__main__")
    except SystemExit as stop:
        assert stop.code in (0, None), f"{script} exited with {stop.code}"
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip()
