"""The memory benchmark (`rxt bench memory`, benchmarks/bench_memory.py) end to end on a tiny random RxT with a
tiny training budget (~25 s of CPU)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rxt_factories import tiny_config
from transformers_rxt import RxTForConversationalGeneration, rxt_token_ids, train_rxt_tokenizer
from transformers_rxt.data.synthetic import memory_dialogues, pretraining_texts, sft_pairs
from transformers_rxt.tokenization_rxt import apply_rxt_chat_template

DIAGNOSE = Path(__file__).resolve().parents[1] / "benchmarks" / "diagnose_memory.py"


@pytest.fixture(scope="module")
def bench():
    from transformers_rxt.benchmarks import bench_memory

    return bench_memory


@pytest.fixture(scope="module")
def rxt_dir(tmp_path_factory):
    texts = pretraining_texts(300, seed=0) + [f"{p['query']} {p['answer']}" for p in sft_pairs(300)]
    tokenizer = train_rxt_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = RxTForConversationalGeneration(tiny_config(vocab=len(tokenizer), seq_len=64, **rxt_token_ids(tokenizer)))
    folder = tmp_path_factory.mktemp("rxt")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "stage1").mkdir()  # a curriculum output root beside the model: its reports set the default budget
    (folder / "stage1" / "stage_report.json").write_text(json.dumps({"stage": "stage1", "train_runtime_s": 1.5}))
    return folder, tokenizer


def test_dialogue_rows_are_the_chat_template(bench, rxt_dir):
    _, tokenizer = rxt_dir
    dialogue = memory_dialogues(1, 3, seed=0)[0]
    (ids, labels), = bench.dialogue_rows(tokenizer, [dialogue], context=10_000)
    messages = []
    for turn in [{"query": dialogue["query"], "answer": dialogue["answer"]}, *dialogue["interactions"]]:
        messages += [{"role": "user", "content": turn["query"]}, {"role": "assistant", "content": turn["answer"]}]
    rendered = apply_rxt_chat_template(tokenizer, messages)
    assert ids == (rendered if isinstance(rendered, list) else rendered["input_ids"])
    answer_tokens = [t for t, lab in zip(ids, labels) if lab != -100]
    assert tokenizer.decode(answer_tokens, skip_special_tokens=True).replace(" ", "") == "".join(
        t["answer"] for t in [dialogue, *dialogue["interactions"]]).replace(" ", "")


def test_history_window_keeps_newest_whole_turns(bench):
    history = [[1, 1], [2, 2, 2], [3]]
    assert bench.history_in_window(history, 2, None) == [1, 1, 2, 2, 2, 3]
    assert bench.history_in_window(history, 2, 6) == [2, 2, 2, 3]
    assert bench.history_in_window(history, 2, 4) == [3]


def test_training_budget_counts_every_process_and_thread(bench):
    # The main job trains stages 1-4 as two one-thread processes: the baselines' CPU budget is twice that wall time.
    reports = [{"stage": "stage0", "wall_time_s": 0.5},
               {"stage": "stage1", "train_runtime_s": 10.0, "world_size": 2, "torch_threads": 1},
               {"stage": "stage4", "train_runtime_s": 100.0, "world_size": 2, "torch_threads": 2},
               {"stage": "stage5_impo", "train_runtime_s": 7.0},  # a report from before world_size was written
               {"stage": "stage9", "cpu_time_s": 3.0, "train_runtime_s": 99.0, "world_size": 2}]
    out = bench.rxt_training_seconds(reports)
    assert out["seconds"] == 0.5 + 20.0 + 400.0 + 7.0 + 3.0
    assert out["clock"] == "cpu+trainer wall+trainer wall x 2+trainer wall x 4+wall"


def test_train_only_and_skip_train_are_refused_together(bench, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--rxt", "x", "--train-only", "shape", "--skip-train"])
    assert "--train-only trains a baseline and --skip-train loads them: pass one of the two" in capsys.readouterr().err


def test_train_only_trains_and_saves_one_baseline(bench, rxt_dir, tmp_path):
    folder, _ = rxt_dir
    out = bench.main(["--rxt", str(folder), "--train-only", "params", "--budget-seconds", "0.5", "--context", "128",
                      "--save-dir", str(tmp_path)])
    assert list(out["trained"]) == [bench.PARAMS] and out["trained"][bench.PARAMS]["steps"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stateless-params"]
    assert json.loads((tmp_path / "stateless-params" / "train_report.json").read_text()) == out["trained"][bench.PARAMS]


@pytest.mark.slow  # ~25 s of CPU
def test_bench_memory_end_to_end(bench, rxt_dir, tmp_path, capsys):
    folder, _ = rxt_dir
    out = bench.main(["--rxt", str(folder), "--dialogues", "4", "--long-dialogues", "2", "--long-turns", "10",
                      "--long-max-distance", "6", "--cost-dialogues", "1", "--cost-new-tokens", "4",
                      "--eval-batch-size", "4", "--context", "128", "--save-dir", str(tmp_path / "baselines"),
                      "--output", str(tmp_path / "results.json")])
    printed = capsys.readouterr().out
    assert out["budget_seconds"] == 1.5  # from the stage report
    assert json.loads((tmp_path / "results.json").read_text())["settings"].keys() == {"9 turns", "10 turns"}
    models = ["RxT", "RxT, memory reset", bench.SHAPE, bench.PARAMS]
    for setting in out["settings"].values():
        assert list(setting["scores"]) == models
        for score in setting["scores"].values():
            assert score["n"] > 0 and 0 <= score["accuracy"] <= 1 and score["perplexity"] > 1
    assert printed.count("| distance |") == 2 and "| 1-4 |" in printed and "| answer perplexity |" in printed
    for name, info in out["stateless"].items():
        assert info["training"]["steps"] > 0 and info["training"]["clock"] == "cpu"
    ratio = out["stateless"][bench.PARAMS]["parameters"] / out["rxt"]["parameters"]
    assert 0.9 < ratio < 1.1

    # The stateless prompt grows with every turn; RxT's is the query alone.
    cost = out["cost"]
    assert "Per-turn cost" in printed and len(cost["RxT"]["cpu_ms"]) == 10
    stateless = [cost[bench.SHAPE]["prompt_tokens"][k] for k in range(1, 11)]
    rxt = [cost["RxT"]["prompt_tokens"][k] for k in range(1, 11)]
    assert all(b > a for a, b in zip(stateless, stateless[1:]))
    assert max(rxt) < 32 < stateless[-1] and stateless[-1] > 3 * max(rxt)

    # Saved baselines are evaluated again without training.
    again = bench.main(["--rxt", str(folder), "--skip-train", "--baseline-dirs", str(tmp_path / "baselines" /
                        "stateless-shape"), str(tmp_path / "baselines" / "stateless-params"), "--dialogues", "2",
                        "--long-dialogues", "0", "--cost-dialogues", "0", "--context", "128"])
    assert again["stateless"][bench.SHAPE]["training"] == out["stateless"][bench.SHAPE]["training"]
    assert list(again["settings"]) == ["9 turns"] and again["cost"] is None


def test_diagnose_memory_gradient_flow_reaches_every_memory_update(rxt_dir):
    """benchmarks/diagnose_memory.py's gradient measure on the stage-4 training model (it once broke silently
    when the stage models changed): one loss over 6-turn episodes reaches all five written memories and the
    writer's components."""
    spec = importlib.util.spec_from_file_location("diagnose_memory", DIAGNOSE)
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    folder, tokenizer = rxt_dir
    flow = diagnose.gradient_flow(str(folder), tokenizer, backprop_turns=0, batch=4)
    assert torch.isfinite(torch.tensor(flow["loss"]))
    assert len(flow["stm_grad_norm"]) == 5 and all(g > 0 for g in flow["stm_grad_norm"]), flow
    assert {"decoder", "encoder", "memory_attention"} <= set(flow["component_grad_norm"]), flow
    assert flow["component_grad_norm"]["memory_attention"] > 0 and flow["component_grad_norm"]["encoder"] > 0


def _diagnose_module():
    spec = importlib.util.spec_from_file_location("diagnose_memory", DIAGNOSE)
    diagnose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diagnose)
    return diagnose


def _fifo_model(vocab: int, **token_ids) -> RxTForConversationalGeneration:
    torch.manual_seed(0)
    memory = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
                  use_tanh_residual_gate=False, fifo_write_slots=2)
    config = tiny_config(vocab=vocab, seq_len=64, memory=memory, decoder={"rope_memory_cross_attention": False},
                         stm_init_type="learned", **token_ids)
    return RxTForConversationalGeneration(config).eval()


def test_diagnose_focus_records_the_attention_the_decoder_computes(monkeypatch):
    """The focus measure's probabilities are the decoder's own: with the eager kernel, the weights it computes for
    each memory cross-attention (mean over heads) equal what the measure records."""
    import transformers_rxt.modeling_rxt as modeling

    diagnose = _diagnose_module()
    model = _fifo_model(96)
    model.config._attn_implementation = "eager"
    probs = diagnose.CrossAttentionProbabilities(model)
    kernel_weights, kernel = [], modeling.eager_attention_forward

    def eager(module, *args, **kwargs):
        out, weights = kernel(module, *args, **kwargs)
        if module in probs.layers:
            kernel_weights.append(weights.mean(dim=1))
        return out, weights

    monkeypatch.setattr(modeling, "eager_attention_forward", eager)
    ids = torch.randint(4, 96, (3, 10))
    memory = model.compute_memory_update(ids, torch.ones_like(ids), model.init_memory(3).memory)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), stm=memory)
    probs.remove()
    assert len(probs.recorded) == len(kernel_weights) == 2
    for recorded, weights in zip(probs.recorded, kernel_weights):
        torch.testing.assert_close(recorded, weights, rtol=0, atol=1e-6)
        torch.testing.assert_close(recorded.sum(-1), torch.ones(3, 10), rtol=0, atol=1e-5)


def test_diagnose_focus_on_held_out_dialogues(rxt_dir):
    """read_focus end to end on a random FIFO model: every recall probe whose value token is found is counted
    once per layer, shares are probabilities, and a model without fifo_write_slots is refused."""
    diagnose = _diagnose_module()
    folder, tokenizer = rxt_dir
    model = _fifo_model(len(tokenizer), **rxt_token_ids(tokenizer))
    focus = diagnose.read_focus(model, tokenizer, dialogues=8, seed=5)
    assert focus["uniform"] == 2 / 8 and len(focus["layers"]) == 2
    counts = {f["right"][0] + f["wrong"][0] for f in focus["layers"]}
    assert len(counts) == 1 and counts.pop() > 0
    for f in focus["layers"]:  # 8 slots, 2 per write: facts up to 4 writes back are still in memory
        assert all(0.0 <= v <= 1.0 for v in f["by_distance"].values()) and set(f["by_distance"]) <= set(range(1, 5))
    rotated = _fifo_model(len(tokenizer), **rxt_token_ids(tokenizer))
    rotated.rxt.decoder.layers[0].memory_cross_attention.rope = "q"
    with pytest.raises(ValueError, match="focus needs unrotated memory queries"):
        diagnose.read_focus(rotated, tokenizer, dialogues=8, seed=5)
    with pytest.raises(ValueError, match="focus needs a model with fifo_write_slots"):
        diagnose.read_focus(RxTForConversationalGeneration.from_pretrained(folder), tokenizer, dialogues=8, seed=5)


def test_diagnose_probe_reads_what_the_slots_hold_and_not_what_they_do_not(rxt_dir, monkeypatch):
    """The write measure's linear probes: given slots that hold the value (one-hot), the value probe recovers every
    held-out value seen in training (its ceiling) and the person probe stays near chance; given noise, both stay
    near chance; on a real (random) FIFO model they report an accuracy per memory layer from the fact's slots."""
    diagnose = _diagnose_module()
    folder, tokenizer = rxt_dir
    model = _fifo_model(len(tokenizer), **rxt_token_ids(tokenizer))
    real = diagnose.value_probe(model, tokenizer, heldout_dialogues=8, seed=5, train_dialogues=40, steps=50)
    assert set(real["targets"]) == {"value", "person", "object"}
    assert all(len(t["layers"]) == 2 and all(0.0 <= r["heldout"] <= 1.0 for r in t["layers"])
               for t in real["targets"].values())
    fact = ("Q?", "A.", "red", "Mia", "kite")
    assert diagnose.written_slots(model, tokenizer, [fact] * 3).shape == (3, 2, 2 * 32)
    facts = diagnose.fact_values("train", 300, 11) + diagnose.fact_values("heldout", 8, 5)
    assert all(f[3] in f[0] or f[3] in f[1] for f in facts)  # the person is named in the fact itself
    values = sorted({f[2] for f in facts})

    def holding_the_value(model, tokenizer, facts):
        return torch.nn.functional.one_hot(torch.tensor([values.index(f[2]) for f in facts]),
                                           len(values)).float()[:, None, :]

    monkeypatch.setattr(diagnose, "written_slots", holding_the_value)
    probed = diagnose.value_probe(model, tokenizer, 8, 5, train_dialogues=300, steps=100)["targets"]
    assert 0.5 < probed["value"]["ceiling"] < 1.0  # some held-out values (numbers) never occur in the train facts
    assert probed["value"]["layers"][0]["heldout"] == pytest.approx(probed["value"]["ceiling"])
    assert probed["person"]["layers"][0]["heldout"] < 0.3
    monkeypatch.setattr(diagnose, "written_slots", lambda m, t, facts: torch.randn(len(facts), 1, 16))
    noise = diagnose.value_probe(model, tokenizer, 8, 5, train_dialogues=300, steps=100)["targets"]
    assert noise["value"]["layers"][0]["heldout"] < 0.3 and noise["person"]["layers"][0]["heldout"] < 0.3


def test_diagnose_kinds_scores_each_fact_kind_on_its_own(rxt_dir, monkeypatch):
    """The kinds measure buckets the questions by fact kind: with answers right for colour questions only, colour
    scores 1 and every other kind 0, and the counts add up to the probes; the answers come from the fact alone."""
    diagnose = _diagnose_module()
    folder, tokenizer = rxt_dir
    diag = diagnose.Diagnoser(RxTForConversationalGeneration.from_pretrained(folder), tokenizer, batch_size=16)
    probes, _ = diagnose.heldout_probes(48, 5)
    expected = {p["question"]: (p["kind"], p["expected"]) for p in probes}
    written = []

    def answer(questions, memory=None, **kwargs):
        written.append(memory)
        return [f"It is {expected[q][1]}." if expected[q][0] == "colour" else "I do not know." for q in questions]

    monkeypatch.setattr(diag, "answer", answer)
    kinds = diag.kinds(probes)
    assert sum(n for n, _ in kinds.values()) == len(probes) and set(kinds) == {p["kind"] for p in probes}
    assert kinds["colour"] == (sum(p["kind"] == "colour" for p in probes), 1.0) and kinds["colour"][0] > 0
    assert all(acc == 0.0 for kind, (_, acc) in kinds.items() if kind != "colour") and len(kinds) > 1
    fresh = diag.fresh(16)
    assert not torch.equal(written[0], fresh)  # the fact was written into a fresh memory before the question
    torch.testing.assert_close(written[0], diag.write(fresh, [p["fact"] for p in probes[:16]]), rtol=0, atol=0)
