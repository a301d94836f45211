"""The `rxt` command line (issue 14): `--help` answers without importing torch and shows every option's default;
`rxt chat` reports a failing turn instead of hanging, and by default lets an answer use what the query leaves of
the interaction window."""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rxt_factories import tiny_model
from transformers_rxt import train_rxt_tokenizer
from transformers_rxt_cli import build_parser

COMMANDS = ["convert-rxlm", "chat", "train", "eval-memory", "bench", "push", "serve"]
REPO = Path(__file__).resolve().parents[1]


def _run_rxt(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "transformers_rxt_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, input=stdin)


# ============================================================================================== --help
@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_does_not_import_torch(command):
    code = ("import sys\nfrom transformers_rxt_cli import main\n"
            "try:\n    main([*sys.argv[1:], '--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'datasets', 'huggingface_hub', 'transformers_rxt')"
            " if m in sys.modules)\nprint('IMPORTED', heavy)\n")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *([command] if command else [])], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    assert "usage: rxt" in done.stdout
    assert "IMPORTED []" in done.stdout
    assert elapsed < 5, f"rxt {command} --help took {elapsed:.1f} s"  # ~0.1 s measured; 5 s leaves room for load


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if action.option_strings and action.help is not argparse.SUPPRESS and "-h" not in action.option_strings:
            yield action


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_that_shows_its_default(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    formatter = sub._get_formatter()
    for action in _options(sub):
        text = formatter._get_help_string(action) if action.help else ""
        assert text, f"rxt {command} {action.option_strings[0]} has no help"
        assert action.required or "default" in text, f"rxt {command} {action.option_strings[0]}: {text!r}"
    help_text = " ".join(sub.format_help().split())
    if command == "chat":
        for option, default in [("--temperature", "0.7"), ("--top-k", "50"), ("--top-p", "0.9")]:
            assert f"(default: {default})" in help_text.split(option)[-1].split("--")[0], option
        assert "default: what is left of the model's interaction window" in help_text


# ============================================================================================== rxt chat
@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny random RxT with its tokenizer in one directory (interaction window: 48 tokens)."""
    texts = [f"the {a} {b} ran to the {c}" for a in ("small", "red", "old") for b in ("fox", "cat")
             for c in ("river", "hill", "house")]
    tokenizer = train_rxt_tokenizer(texts * 3, vocab_size=300)
    model = tiny_model(vocab=300)
    path = tmp_path_factory.mktemp("chat-model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert model.config.max_interaction_length == 48
    return path


def test_chat_reports_a_failed_turn_and_exits_non_zero(chat_model, tmp_path):
    """A generate error in the worker thread (here: an answer longer than the window allows) used to leave the
    main thread waiting on the streamer forever; now it is printed and a scripted chat stops with status 1."""
    script = tmp_path / "chat.txt"
    script.write_text("the red fox ran to the river\nthe old cat ran to the hill\n")
    done = _run_rxt("chat", str(chat_model), "--script", str(script), "--greedy", "--max-new-tokens", "1000")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rxt chat: error:" in done.stderr and "holds at most 48 tokens" in done.stderr
    assert "lower max_new_tokens to" in done.stderr
    assert "Traceback" not in done.stderr
    assert "the old cat" not in done.stdout  # the script stopped at the failed turn


def test_chat_from_the_keyboard_goes_on_after_a_failed_turn(chat_model):
    too_long = " ".join(["the red fox ran to the river"] * 12)  # over the 48-token window on its own
    done = _run_rxt("chat", str(chat_model), "--greedy", stdin=f"{too_long}\nthe old cat\n\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("rxt chat: error:") == 1
    assert done.stdout.count("[memory updated") == 1  # the second turn was answered and written to memory


def test_chat_default_answer_length_is_what_the_window_leaves(chat_model, monkeypatch, capsys, tmp_path):
    """Without --max-new-tokens an answer may run to the end of the interaction window (the old fixed default
    of 64 exceeded the main job's 64-token window, so every turn failed)."""
    import torch

    from transformers_rxt import RxTForConversationalGeneration
    from transformers_rxt.cli import main
    from transformers_rxt.tokenization_rxt import load_rxt_tokenizer, tokenize_prompt

    seen = []
    generate = RxTForConversationalGeneration.generate

    def spy(self, *args, **kwargs):
        seen.append((kwargs["input_ids"].shape[1], kwargs["max_new_tokens"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(RxTForConversationalGeneration, "generate", spy)
    script = tmp_path / "chat.txt"
    script.write_text("the red fox\nthe old cat ran to the hill and the river\n")
    threads = torch.get_num_threads()
    try:
        assert main(["chat", str(chat_model), "--script", str(script), "--greedy"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.count("[memory updated") == 2
    tokenizer = load_rxt_tokenizer(str(chat_model))
    prompts = [len(tokenize_prompt(tokenizer, q)["input_ids"]) for q in script.read_text().splitlines()]
    assert seen == [(n, 48 - n) for n in prompts]
