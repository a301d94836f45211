"""The README's and the model card's Python snippets run as written.

The Quickstart snippets and the card's Usage snippet run unchanged on the model the main job trains (the
`micro` preset, trained once per session by the `micro_run` fixture); only the repository-id placeholder is
swapped for its local directory. Elsewhere placeholders ("path", "path/to/llama", ...) become local files
and step counts / model sizes are shrunk; nothing else is edited.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import require_parity_fixture

README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(marker: str, text: str | None = None) -> str:
    """The python block of `text` (default: the README) that contains `marker` (exactly one)."""
    text = README.read_text() if text is None else text
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} python blocks contain {marker!r}"
    return blocks[0]


def run(code: str, namespace: dict, replacements: dict) -> dict:
    for old, new in replacements.items():
        assert old in code, f"README snippet no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_quickstart_snippets_run_as_written_on_the_main_jobs_model(micro_run, tmp_path, monkeypatch, capsys):
    from transformers_rxt import STMCache

    monkeypatch.chdir(tmp_path)  # the snippets write conversation.safetensors
    hub = str(micro_run / "hub")
    ns = run(snippet('from_pretrained("path/or/hub-id"'), {}, {"path/or/hub-id": hub})
    answers = capsys.readouterr().out.splitlines()
    assert len(answers) == 2 and all(answers), answers
    saved = STMCache.load("conversation.safetensors", model=ns["model"])
    assert torch.equal(saved.memory, ns["stm"].memory)

    ns = run(snippet("tokenize_prompts(tokenizer, queries)"), ns, {})
    assert ns["stm"].memory.shape[0] == 3 and ns["out"].shape[0] == 4

    ns = run(snippet("chat.interact("), ns, {})
    streamed = capsys.readouterr().out
    assert streamed.endswith("\n[Memory update]\n[Memory updated]") and len(streamed) > len(
        "\n[Memory update]\n[Memory updated]"), streamed
    assert not torch.equal(ns["stm"].memory, saved.memory)  # interact continued the saved conversation

    ns = run(snippet('pipeline("text-generation"'), ns, {})
    assert ns["reply"]["role"] == "assistant" and capsys.readouterr().out == ns["reply"]["content"] + "\n"


def test_model_card_usage_snippet_runs_as_written_without_the_package(micro_run, tmp_path):
    """The card's Usage section, as a Hub user runs it: plain transformers, remote code, no transformers_rxt."""
    hub = micro_run / "hub"
    code = snippet("AutoModelForCausalLM.from_pretrained(repo", (hub / "README.md").read_text())
    assert 'repo = "<namespace>/<model-name>"' in code  # the main job exports without a repo id
    code = code.replace('"<namespace>/<model-name>"', repr(str(hub)))
    script = "import sys\nsys.modules['transformers_rxt'] = None  # any import of the package fails\n" + code
    script += textwrap.dedent("""
        stm.wait()
        print("STM", type(stm).__module__, tuple(stm.memory.shape))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    *answers, stm_line = result.stdout.splitlines()
    assert len(answers) == 2 and stm_line.startswith("STM transformers_modules."), result.stdout
    assert "trust_remote_code" not in result.stderr, result.stderr[-3000:]  # no prompt, no warning


def test_rxlm_loading_snippet():
    rxlm, memattn = require_parity_fixture("rxt-alpha-tiny"), require_parity_fixture("memattn-interlayer-tiny")
    ns = run(snippet("from_rxlm_pretrained"), {}, {'("path")': f"({str(rxlm)!r})",
                                                   '("component-path")': f"({str(memattn)!r})"})
    assert not ns["model"].training and ns["memattn"] is not None


def test_impo_dmpo_snippet(micro_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the snippet writes out/impo, out/dmpo
    ns = run(snippet("IMPOTrainer("), {}, {'"outputs/tiny/stage4"': repr(str(micro_run / "stage4")),
                                           "max_steps=150": "max_steps=1", "max_steps=100": "max_steps=1",
                                           "build_memory_dialogues(2000,": "build_memory_dialogues(16,"})
    assert ns["impo"].state.global_step == 1 and ns["dmpo"].state.global_step == 1


def test_tensorbleu_snippets():
    ns = run(snippet("tensor_sentence_bleu(cand, refs, pad_token_id=0)"), {}, {})
    assert float(ns["tensor_sentence_bleu"](ns["cand"], ns["refs"], pad_token_id=0)) == pytest.approx(0.3328, abs=1e-4)
    ns = run(snippet('evaluate.load("tensorbleu")'), {}, {})
    assert ns["bleu"].compute(predictions=[[5, 6, 7, 8]], references=[[[5, 6, 7, 8]]])["bleu"] == pytest.approx(1.0)


def test_sqa_llama_snippet(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, LlamaConfig

    monkeypatch.chdir(tmp_path)
    small = dict(hidden_size=128, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=2,
                 intermediate_size=256, vocab_size=256)
    AutoModelForCausalLM.from_config(LlamaConfig(**small)).save_pretrained(tmp_path / "llama")
    ns = run(snippet("convert_to_sqa(model"), {}, {
        "hidden_size=1024, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=12":
            "hidden_size=128, num_attention_heads=16, num_key_value_heads=4, num_hidden_layers=2, "
            "intermediate_size=256, vocab_size=256",
        '"path/to/llama"': repr(str(tmp_path / "llama"))})
    model = ns["model"]
    assert model.config.num_attention_heads == 8 and model.config._attn_implementation == "sqa"
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 256)
