"""The README's Python snippets run as written: placeholders ("path/or/hub-id", ...) are swapped for local files
(the rxlm fixture, a tiny Llama), and step counts / model sizes are shrunk; nothing else is edited. Snippets that
need the network or elided arguments (`...`) are skipped by name."""

import re
from pathlib import Path

import pytest

from conftest import FIXTURES

README = Path(__file__).resolve().parents[1] / "README.md"
RXLM = FIXTURES / "rxt-alpha-tiny"
MEMATTN = FIXTURES / "memattn-interlayer-tiny"


def snippet(marker: str) -> str:
    """The README python block that contains `marker` (exactly one)."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if marker in b]
    assert len(blocks) == 1, f"{len(blocks)} README python blocks contain {marker!r}"
    return blocks[0]


def run(code: str, namespace: dict, replacements: dict) -> dict:
    for old, new in replacements.items():
        assert old in code, f"README snippet no longer contains {old!r}"
        code = code.replace(old, new)
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.fixture
def hf_model_dir(tmp_path, monkeypatch):
    if not RXLM.is_dir():
        pytest.skip(f"rxlm fixture not found at {RXLM}")
    from transformers_rxt.conversion import convert_rxlm_checkpoint

    convert_rxlm_checkpoint(str(RXLM), str(tmp_path / "model"))
    monkeypatch.chdir(tmp_path)  # snippets write files (conversation.safetensors, out/, llama-sqa)
    return str(tmp_path / "model")


def test_quickstart_snippets(hf_model_dir, capsys):
    ns = run(snippet('from_pretrained("path/or/hub-id"'), {}, {"path/or/hub-id": hf_model_dir,
                                                                "max_new_tokens=64": "max_new_tokens=8"})
    assert Path("conversation.safetensors").is_file()
    ns = run(snippet("tokenize_prompts(tokenizer, queries)"), ns, {"max_new_tokens=64": "max_new_tokens=8"})
    assert ns["stm"].memory.shape[0] == 3 and ns["out"].shape[0] == 4
    run(snippet("model.interact("), ns, {"max_seq_len=256": "max_seq_len=24"})
    assert capsys.readouterr().out


def test_rxlm_loading_snippet():
    if not MEMATTN.is_dir():
        pytest.skip(f"rxlm fixture not found at {MEMATTN}")
    ns = run(snippet("from_rxlm_pretrained"), {}, {'("path")': f"({str(RXLM)!r})",
                                                   '("component-path")': f"({str(MEMATTN)!r})"})
    assert not ns["model"].training and ns["memattn"] is not None


def test_impo_dmpo_snippet(hf_model_dir):
    ns = run(snippet("IMPOTrainer("), {}, {'"outputs/tiny/stage4"': repr(hf_model_dir),
                                           "max_steps=150": "max_steps=1", "max_steps=100": "max_steps=1",
                                           "build_memory_dialogues(2000,": "build_memory_dialogues(16,"})
    assert ns["impo"].state.global_step == 1 and ns["dmpo"].state.global_step == 1


def test_tensorbleu_snippets():
    ns = run(snippet("tensor_sentence_bleu(cand, refs, pad_token_id=0)"), {}, {})
    assert float(ns["tensor_sentence_bleu"](ns["cand"], ns["refs"], pad_token_id=0)) == pytest.approx(0.3328, abs=1e-4)
    ns = run(snippet('evaluate.load("tensorbleu")'), {}, {})
    assert ns["bleu"].compute(predictions=[[5, 6, 7, 8]], references=[[[5, 6, 7, 8]]])["bleu"] == pytest.approx(1.0)


def test_sqa_llama_snippet(tmp_path, monkeypatch):
    import torch
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
