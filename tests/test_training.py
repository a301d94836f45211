"""Stage trainers (issue 5): losses go down, saving/loading, S != T in stage 3, gradual unfreezing, resume."""

import json
import math

import pytest
import torch
from transformers import TrainerCallback

from rxt_factories import tiny_config
from transformers_rxt import RxTForConversationalGeneration, rxt_token_ids, train_rxt_tokenizer
from transformers_rxt.data import (
    DataCollatorForRxTEpisodes,
    build_memory_dialogues,
    memory_dialogues,
    pretraining_texts,
    sft_pairs,
    tokenize_mrl_dataset,
    tokenize_pretraining_dataset,
    tokenize_sft_dataset,
)
from transformers_rxt.training import (
    JointLMConfig,
    JointLMTrainer,
    MemoryAttentionConfig,
    MemoryAttentionTrainer,
    MemoryAwareConfig,
    MemoryAwareTrainer,
    RxTForJointLMTraining,
    RxTForMemoryAwareTraining,
    evaluate_memory_retention,
    segment_pooling,
)
from transformers_rxt.training.episodes import compute_memory_update, iter_turns
from transformers_rxt.training.utils import component_of

SLOTS = 8  # fewer slots than the ~17-token turns: stage 3 must not need S == T


@pytest.fixture(scope="module")
def tok():
    texts = pretraining_texts(300, seed=0) + [f"{p['query']} {p['answer']}" for p in sft_pairs(300)]
    return train_rxt_tokenizer(texts, vocab_size=400)


def make_model(tok, seed=0, **kwargs):
    torch.manual_seed(seed)
    cfg = tiny_config(vocab=len(tok), seq_len=64, slots=SLOTS, **rxt_token_ids(tok), **kwargs)
    return RxTForConversationalGeneration(cfg).train()


@pytest.fixture(scope="module")
def text_data(tok):
    return tokenize_pretraining_dataset(
        __import__("datasets").Dataset.from_dict({"text": pretraining_texts(8, seed=1)}), tok, 64, truncation=True
    )


@pytest.fixture(scope="module")
def episodes(tok):
    return tokenize_mrl_dataset(build_memory_dialogues(8, max_distance=3, seed=0), tok, 64)


def common_args(tmp_path, **kwargs):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        lr_scheduler_type="constant",
        seed=0,
    )
    base.update(kwargs)
    return base


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def early_late(values, n=2):
    return sum(values[:n]) / n, sum(values[-n:]) / n


# ------------------------------------------------------------------------------------------------- stage 1-2
def test_joint_trainer_loss_goes_down_and_logs_components(tok, text_data, tmp_path):
    args = JointLMConfig(**common_args(tmp_path, max_steps=30, learning_rate=1e-2))
    trainer = JointLMTrainer(make_model(tok), args, train_dataset=text_data, processing_class=tok)
    trainer.train()
    first, last = early_late(losses(trainer))
    assert last < 0.8 * first, losses(trainer)
    log = trainer.state.log_history[0]
    for key in ("mlm_loss", "lm_loss", "mlm_accuracy", "lm_accuracy", "tokens_per_second"):
        assert key in log
    assert math.isclose(log["loss"], log["mlm_loss"] + log["lm_loss"], rel_tol=1e-4)
    summary = trainer.state.log_history[-1]
    assert summary["train_tokens"] > 0 and summary["train_tokens_per_second"] > 0


def test_joint_sft_saves_hf_directory_that_next_stage_loads(tok, tmp_path):
    sft = tokenize_sft_dataset(__import__("datasets").Dataset.from_list(sft_pairs(8, seed=2)), tok, 64)
    args = JointLMConfig(**common_args(tmp_path, max_steps=2, learning_rate=1e-3, memory_noise=0.2,
                                       memory_dropout=0.2))
    trainer = JointLMTrainer(make_model(tok), args, train_dataset=sft, processing_class=tok)
    trainer.train()
    out = tmp_path / "stage"
    trainer.save_model(str(out))
    loaded = RxTForConversationalGeneration.from_pretrained(out)  # the RxT model, without the MLM head
    state = trainer.model.state_dict()
    assert set(state) - set(loaded.state_dict()) == {k for k in state if k.startswith("mlm_head.")} != set()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert json.loads((out / "config.json").read_text())["architectures"] == ["RxTForConversationalGeneration"]
    assert (out / "modeling_rxt.py").is_file() and not (out / "joint.py").exists()  # the RxT model's code
    head = RxTForJointLMTraining.from_pretrained(out).mlm_head
    assert torch.equal(head.decoder.weight, trainer.model.mlm_head.decoder.weight)
    # The next stage takes the directory itself (model + MLM head + tokenizer).
    nxt = JointLMTrainer(str(out), JointLMConfig(**common_args(tmp_path, max_steps=1)))
    assert torch.equal(nxt.model.mlm_head.dense.weight, trainer.model.mlm_head.dense.weight)
    assert (out / "tokenizer.json").is_file()
    # A plain RxT directory (no head) gives the joint model a fresh head instead of failing.
    loaded.save_pretrained(tmp_path / "plain")
    fresh = RxTForJointLMTraining.from_pretrained(tmp_path / "plain")
    assert fresh.mlm_head.dense.weight.shape == head.dense.weight.shape


# ------------------------------------------------------------------------------------------------- stage 3
def test_segment_pooling_identity_padding_and_slot_counts():
    enc = torch.randn(2, 3, 6, 4)
    full = torch.ones(2, 6, dtype=torch.long)
    assert torch.allclose(segment_pooling(enc, full, 6), enc)  # S == T, no padding: the reference's label
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    fewer = segment_pooling(enc, mask, 2)  # S < T: means of contiguous halves of the real tokens
    assert fewer.shape == (2, 3, 2, 4)
    assert torch.allclose(fewer[0, :, 0], enc[0, :, :2].mean(1))
    assert torch.allclose(fewer[0, :, 1], enc[0, :, 2:4].mean(1))
    more = segment_pooling(enc, mask, 8)  # S > T: slots share tokens, pads never used
    assert more.shape == (2, 3, 8, 4)
    assert torch.allclose(more[0, :, 0], enc[0, :, 0]) and torch.allclose(more[0, :, 7], enc[0, :, 3])
    left = torch.cat([enc[:1, :, 4:], enc[:1, :, :4]], dim=2)  # the same row, left-padded
    assert torch.allclose(segment_pooling(left, mask[:1].flip(1), 3), segment_pooling(enc[:1], mask[:1], 3))


def test_memory_attention_trainer_with_fewer_slots_than_tokens(tok, episodes, tmp_path):
    model = make_model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = MemoryAttentionConfig(
        **common_args(tmp_path, max_steps=12, learning_rate=3e-3),
        label_weights_random_factor=0.1, input_noise=0.05, label_noise=0.05,
    )
    trainer = MemoryAttentionTrainer(model, args, train_dataset=episodes, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[-1] > SLOTS  # turns are longer than the memory: S != T
    trainer.train()
    first, last = early_late(losses(trainer))
    assert last < first - 0.02, losses(trainer)
    assert "cosine" in trainer.state.log_history[0] and "memory_rmse_turn_0" in trainer.state.log_history[0]
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == (component_of(name) == "memory_attention") or "inv_freq" in name, name


def test_stage3_label_of_a_fifo_write_is_the_interaction_pooled_onto_the_fresh_slots(tok, episodes, tmp_path):
    """A FIFO write fills `fifo_write_slots` fresh slots and only shifts the others, so stage 3 scores the fresh
    slots against the interaction pooled onto them (no blend with the memory: they held nothing) and leaves the
    shifted copies out. Against the blend of all S slots, the fresh slots' label was the first few tokens of the
    interaction mixed with the slots the write had just dropped."""
    fifo = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
                use_tanh_residual_gate=False, fifo_write_slots=2)
    model = make_model(tok, memory=fifo, stm_init_type="learned")
    args = MemoryAttentionConfig(**common_args(tmp_path, max_steps=1), input_noise=0.0, label_noise=0.0)
    trainer = MemoryAttentionTrainer(model, args, train_dataset=episodes, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    stage_model = trainer.model.eval()
    with torch.no_grad():
        output = stage_model(**{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "turn_mask")})
        stm, cosines = stage_model.initial_memory_tensor(batch["input_ids"].shape[0]), []
        for turn in iter_turns(batch["input_ids"], batch["attention_mask"], batch["turn_mask"]):
            encoded, _ = stage_model.encode(turn.input_ids, turn.attention_mask)
            written = stage_model.memory_attention(stm, encoded, turn.attention_mask)
            pooled = segment_pooling(encoded, turn.attention_mask, 2)
            cos = torch.nn.functional.cosine_similarity(written[:, :, :2], pooled, dim=-1).mean(dim=(1, 2))
            cosines.append((cos * turn.valid).sum() / turn.valid.sum())
            stm = torch.where(turn.valid[:, None, None, None], written, stm)
    torch.testing.assert_close(output.loss, -torch.stack(cosines).mean(), rtol=0, atol=1e-6)
    torch.testing.assert_close(output.metrics["cosine_turn_0"], cosines[0], rtol=0, atol=1e-6)
    trainer.train()  # and it trains


def test_fact_kind_weights_change_the_training_mix_only(tmp_path):
    """DataArguments.fact_kind_weights re-weights the fact kinds of the synthetic training data (here: ages only)
    and leaves the held-out dialogues, the default mix and the order of the corpus alone; bad weights are refused."""
    from transformers_rxt.training.stages.common import DataArguments, mrl_records

    ages_only = {"colour": 0, "size": 0, "place": 0, "age": 1, "count": 0, "pet": 0}
    data = DataArguments(num_samples=12, eval_samples=12, max_distance=3, fact_kind_weights=json.dumps(ages_only))
    kinds = [p["kind"] for r in mrl_records(data) for p in r["probes"]]
    assert kinds and set(kinds) == {"age"}
    plain = DataArguments(num_samples=12, eval_samples=12, max_distance=3)
    assert mrl_records(data, heldout=True).to_list() == mrl_records(plain, heldout=True).to_list()
    assert len({p["kind"] for r in mrl_records(plain) for p in r["probes"]}) > 1
    assert memory_dialogues(4, 3, seed=0) == memory_dialogues(4, 3, seed=0, kind_weights=None)
    assert sft_pairs(5, kind_weights=ages_only) != sft_pairs(5)
    with pytest.raises(ValueError, match=r"kind_weights must give every fact kind \['age', 'colour', 'count', "
                                         r"'pet', 'place', 'size'\] a weight >= 0, not all 0; got \{'age': 1\}"):
        DataArguments(fact_kind_weights={"age": 1})


def test_stage3_accumulated_step_equals_one_step_on_the_concatenated_batch(tok, episodes, tmp_path):
    """One SGD step of stage 3 on 4 episodes of 2, 2, 4 and 3 turns: two accumulated micro-batches of 2 give
    the update of one batch of 4. Each turn's loss is a mean over the step's whole batch (the trainer sums
    ``loss_item_counts`` over micro-batches and processes, as in stage 4), not each micro-batch's own mean (with
    those, turns 2-3 would weigh double: only the second micro-batch has them)."""
    rows = [{"turn_input_ids": episodes[i]["turn_input_ids"][:n]} for i, n in enumerate((2, 2, 4, 3))]
    assert all(len(episodes[i]["turn_input_ids"]) >= 4 for i in range(4))

    def one_step(per_device: int, accumulation: int, out: str) -> tuple[dict, dict]:
        model = make_model(tok, stm_init_type="learned")
        initial = {n: p.detach().clone() for n, p in model.memory_attention.named_parameters()}
        args = MemoryAttentionConfig(**common_args(
            tmp_path / out, max_steps=1, per_device_train_batch_size=per_device, optim="sgd", learning_rate=1.0,
            weight_decay=0.0, max_grad_norm=0.0, train_sampling_strategy="sequential",
            gradient_accumulation_steps=accumulation), stm_diff_weight=0.5)
        MemoryAttentionTrainer(model, args, train_dataset=rows, processing_class=tok).train()
        return initial, {n: p.detach() for n, p in model.memory_attention.named_parameters()}

    initial, whole = one_step(4, 1, "one")
    _, accumulated = one_step(2, 2, "two")
    assert max(float((whole[n] - p).abs().max()) for n, p in initial.items()) > 1e-2  # a real step
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-5, msg=name)


def test_stage1_accumulated_step_equals_one_step_on_the_concatenated_batch(tok, text_data, tmp_path):
    """One SGD step of stage 1 on 4 texts with 4, 10, 40 and 60 trained decoder tokens: two accumulated
    micro-batches of 2 give the update of one batch of 4. The MLM and LM losses are token means over the step's
    whole batch (the trainer masks each micro-batch when it fetches the step's batches and sums
    ``loss_item_counts`` over them and the processes), not each micro-batch's own mean. Masking every token with
    [MASK] makes the masks the same in both runs; the texts have one length (the decoder's stand-in memory, the
    encoder's states, includes the padding, so padding would change the rows' losses)."""
    rows = []
    for i, trained in enumerate((4, 10, 40, 60)):
        ids = list(text_data[i]["input_ids"])
        assert len(ids) == 64
        rows.append({"input_ids": ids, "labels": [-100] * (64 - trained) + ids[64 - trained:]})

    def one_step(per_device: int, accumulation: int, out: str) -> tuple[dict, dict, float]:
        model = make_model(tok)
        initial = {n: p.detach().clone() for n, p in model.named_parameters()}
        args = JointLMConfig(**common_args(
            tmp_path / out, max_steps=1, per_device_train_batch_size=per_device, optim="sgd", learning_rate=1.0,
            weight_decay=0.0, max_grad_norm=0.0, train_sampling_strategy="sequential",
            gradient_accumulation_steps=accumulation), mlm_probability=1.0, mask_replace_prob=1.0,
            random_replace_prob=0.0)
        trainer = JointLMTrainer(model, args, train_dataset=rows, processing_class=tok)
        trainer.train()
        return initial, {n: p.detach() for n, p in model.named_parameters()}, losses(trainer)[0]

    initial, whole, loss = one_step(4, 1, "one")
    _, accumulated, accumulated_loss = one_step(2, 2, "two")
    assert max(float((whole[n] - p).abs().max()) for n, p in initial.items()) > 1e-2  # a real step
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=0, atol=1e-5, msg=name)
    assert accumulated_loss == pytest.approx(loss, abs=1e-5)


def test_memory_attention_position_alignment_needs_short_turns(tok, episodes, tmp_path):
    args = MemoryAttentionConfig(**common_args(tmp_path, max_steps=1), slot_alignment="position")
    trainer = MemoryAttentionTrainer(make_model(tok), args, train_dataset=episodes, processing_class=tok)
    with pytest.raises(ValueError, match="slot_alignment='segment'"):
        trainer.train()


# ------------------------------------------------------------------------------------------------- stage 4
def test_memory_aware_trainer_loss_goes_down_with_per_turn_logs(tok, episodes, tmp_path):
    args = MemoryAwareConfig(**common_args(tmp_path, max_steps=25, learning_rate=1e-2))
    trainer = MemoryAwareTrainer(make_model(tok), args, train_dataset=episodes, eval_dataset=episodes,
                                 processing_class=tok)
    trainer.train()
    first, last = early_late(losses(trainer))
    assert last < 0.7 * first, losses(trainer)
    log = trainer.state.log_history[0]
    assert {"loss_turn_0", "loss_turn_3", "answer_accuracy", "trainable_parameters"} <= set(log)
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_loss_turn_1", "eval_answer_accuracy"} <= set(metrics)
    assert metrics["eval_loss"] == pytest.approx(trainer.evaluate()["eval_loss"])  # eval draws fixed noise


def test_backprop_turns_changes_gradients_not_losses(tok, episodes):
    batch = DataCollatorForRxTEpisodes.from_tokenizer(tok)([episodes[i] for i in range(4)])
    grads = {}
    for turns in (1, 0):
        model = make_model(tok, seed=3)
        module = RxTForMemoryAwareTraining.from_rxt(
            model, MemoryAwareConfig(output_dir="x", backprop_turns=turns, use_cpu=True))
        out = module(**batch, generator=torch.Generator().manual_seed(0))
        out.loss.backward()
        grads[turns] = (float(out.loss.detach()), torch.cat([p.grad.flatten() for p in model.encoder.parameters()]))
    assert grads[1][0] == pytest.approx(grads[0][0], abs=1e-6)  # same forward
    assert not torch.allclose(grads[1][1], grads[0][1])  # full-episode BPTT reaches earlier updates


def test_memory_aware_rows_without_a_turn_keep_their_memory(tok):
    ds = tokenize_mrl_dataset(build_memory_dialogues(2, max_distance=3, seed=1), tok, 64)
    features = [dict(ds[0]), dict(ds[1])]
    features[1]["turn_input_ids"] = features[1]["turn_input_ids"][:2]  # a shorter episode
    features[1]["turn_labels"] = features[1]["turn_labels"][:2]
    batch = DataCollatorForRxTEpisodes.from_tokenizer(tok)(features)
    module = RxTForMemoryAwareTraining.from_rxt(make_model(tok), MemoryAwareConfig(output_dir="x", use_cpu=True))
    out = module(**batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    stm = torch.randn(2, 2, SLOTS, 32)
    valid = torch.tensor([True, False])
    new = compute_memory_update(module, batch["input_ids"][:, 3], batch["attention_mask"][:, 3], stm, valid)
    assert torch.equal(new[1], stm[1]) and not torch.equal(new[0], stm[0])


@pytest.mark.parametrize("review_loss_weight,write_token_loss_weight", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.3)],
                         ids=["turns", "turns_and_reviews", "turns_reviews_and_writes"])
def test_gradient_accumulation_gives_the_update_of_the_whole_batch(tmp_path, review_loss_weight,
                                                                   write_token_loss_weight):
    """Stage 4, 2 micro-batches of 2 episodes (different turn counts and answer lengths) accumulated = one batch
    of 4: the loss is normalised by the whole step's answer tokens per turn and, for the write token loss, by
    the whole step's scored writes per boundary (plain SGD: the update is the gradient). The 2-process version
    of this is in test_training_distributed.py."""
    from ddp_stage4_step import one_step

    weights = dict(review_loss_weight=review_loss_weight, write_token_loss_weight=write_token_loss_weight)
    initial, whole = one_step(str(tmp_path / "whole"), per_device=4, **weights)
    _, accumulated = one_step(str(tmp_path / "accumulated"), per_device=2, accumulation=2, **weights)
    params = dict(accumulated.model.named_parameters())
    assert max(float((p.detach() - initial[n]).abs().max()) for n, p in whole.model.named_parameters()) > 1e-2
    for name, value in whole.model.named_parameters():
        torch.testing.assert_close(params[name], value, rtol=0, atol=1e-5, msg=name)
    assert losses(accumulated) == pytest.approx(losses(whole), abs=1e-5)


def test_gradient_checkpointing_stage4_run_gives_the_same_loss_and_update(tmp_path):
    """A stage-4 step with `gradient_checkpointing=True` (every decoder and encoder layer recomputed in backward,
    the memory carried through 2-4 turns, backprop through the whole episode) gives the loss and, with plain SGD,
    the gradient (the update) of the same step without it."""
    from ddp_stage4_step import one_step

    calls = []

    class CountForwards(TrainerCallback):  # counts the first decoder layer's attention passes of the step
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.decoder.layers[0].attention.register_forward_pre_hook(lambda *a: calls.append(1))

    initial, plain = one_step(str(tmp_path / "plain"), per_device=4, callbacks=[CountForwards()])
    assert not plain.model.is_gradient_checkpointing and len(calls) == 4  # one decoder pass per turn (4 turns)
    calls.clear()
    _, checkpointed = one_step(str(tmp_path / "checkpointed"), per_device=4, gradient_checkpointing=True,
                               callbacks=[CountForwards()])
    assert checkpointed.model.is_gradient_checkpointing and len(calls) == 8  # each pass again in the backward
    assert losses(checkpointed) == losses(plain)
    params = dict(checkpointed.model.named_parameters())
    assert max(float((p.detach() - initial[n]).abs().max()) for n, p in plain.model.named_parameters()) > 1e-2
    for name, value in plain.model.named_parameters():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=name)


class Snapshots(TrainerCallback):
    """Copies of every parameter after each optimizer step, plus which ones had optimizer state."""

    def __init__(self, trainer):
        self.trainer, self.params, self.with_state, self.requires_grad = trainer, [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        model, opt = self.trainer.model, self.trainer.optimizer
        self.params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        self.with_state.append({n for n, p in model.named_parameters() if len(opt.state.get(p, {})) > 0})
        self.requires_grad.append({n for n, p in model.named_parameters() if p.requires_grad})


@pytest.mark.parametrize("ddp_mode", [False, True], ids=["requires_grad", "ddp_grad_masking"])
def test_gradual_unfreeze_changes_what_the_optimizer_updates(ddp_mode, tok, episodes, tmp_path, monkeypatch):
    # Under DDP every parameter keeps requires_grad=True and frozen gradients are dropped instead; the
    # distributed code path is exercised here in one process.
    monkeypatch.setattr(MemoryAwareTrainer, "_distributed", property(lambda self: ddp_mode))
    args = MemoryAwareConfig(
        **common_args(tmp_path, max_steps=5, learning_rate=1e-3, weight_decay=0.1),
        unfreeze_memory_attention_step=2, unfreeze_encoder_step=4,
    )
    trainer = MemoryAwareTrainer(make_model(tok), args, train_dataset=episodes, processing_class=tok)
    names = {g["name"] for g in trainer.create_optimizer().param_groups}
    # Every component is in the optimizer from the start, frozen or not.
    assert {"embedding", "decoder", "memory_attention", "encoder"} <= {n.split(".")[0] for n in names}
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    snaps = Snapshots(trainer)
    trainer.add_callback(snaps)
    trainer.train()

    def moved(step, component):
        prev = start if step == 0 else snaps.params[step - 1]
        return any(not torch.equal(p, prev[n]) for n, p in snaps.params[step].items() if component_of(n) == component)

    def touched(step, component):
        return any(component_of(n) == component for n in snaps.with_state[step])

    def trainable(step, component):
        return any(component_of(n) == component for n in snaps.requires_grad[step])

    for step in range(5):  # snapshot i = after optimizer step i (0-based); the schedule reads steps done
        assert moved(step, "decoder")
        assert moved(step, "memory_attention") == (step >= 2) == touched(step, "memory_attention")
        assert moved(step, "encoder") == (step >= 4) == touched(step, "encoder")
        assert trainable(step, "encoder") == (step >= 4 or ddp_mode)
    counts = [h["trainable_parameters"] for h in trainer.state.log_history if "trainable_parameters" in h]
    assert counts[0] < counts[2] < counts[4]
    assert trainer.trainable_components == {"embedding", "decoder", "memory_attention", "encoder"}


# ------------------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("stage", ["joint", "memory_aware"])
def test_resume_from_checkpoint_gives_the_same_next_step_loss(stage, tok, text_data, episodes, tmp_path):
    def run(out, resume=None):
        kwargs = common_args(tmp_path, output_dir=str(out), max_steps=4, learning_rate=2e-3, save_strategy="steps",
                             save_steps=2, lr_scheduler_type="linear", seed=7)
        if stage == "joint":
            trainer = JointLMTrainer(make_model(tok), JointLMConfig(**kwargs, memory_noise=0.3, memory_dropout=0.2),
                                     train_dataset=text_data, processing_class=tok)
        else:
            trainer = MemoryAwareTrainer(make_model(tok), MemoryAwareConfig(**kwargs, unfreeze_encoder_step=3),
                                         train_dataset=episodes, processing_class=tok)
        trainer.train(resume_from_checkpoint=resume)
        return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}

    full = run(tmp_path / "a")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-2"))
    assert set(resumed) == {1, 2, 3, 4}  # steps 1-2 come from the checkpoint's state, 3-4 were run again
    assert resumed[3] == pytest.approx(full[3], abs=1e-6)
    assert resumed[4] == pytest.approx(full[4], abs=1e-5)


# ------------------------------------------------------------------------------------------------- evaluation
def test_evaluate_memory_retention_reports_both_runs(tok):
    dialogues = build_memory_dialogues(6, max_distance=3, seed=5, split="heldout")
    result = evaluate_memory_retention(make_model(tok).eval(), tok, dialogues, batch_size=4, max_new_tokens=6)
    assert set(result["memory"]["per_distance"]) <= {1, 2, 3}
    assert result["memory"]["n"] == result["reset"]["n"] > 0
    assert "distance" in result["table"] and "memory" in result["table"]
    assert result["perplexity"]["memory"] > 1 and result["probe_perplexity"]["reset"] > 1
    assert result["examples"] and {"memory_answer", "reset_answer", "expected"} <= set(result["examples"][0])


def test_evaluation_records_no_autograd_graph(tok, monkeypatch):
    """The teacher-forced memory updates used to run with grad on, chaining autograd graphs from turn to turn
    (rxt eval-memory on 512 dialogues peaked at 5.4 GB RSS); every update now runs without a graph."""
    import gc

    model = make_model(tok).eval()
    modes = []
    update = type(model).update_memory

    def spy(self, *args, **kwargs):
        modes.append(torch.is_grad_enabled())
        return update(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "update_memory", spy)
    dialogues = build_memory_dialogues(8, max_distance=3, seed=5, split="heldout")
    assert torch.is_grad_enabled()
    evaluate_memory_retention(model, tok, dialogues, batch_size=4, max_new_tokens=4)
    assert modes and not any(modes)
    assert torch.is_grad_enabled()  # the caller's mode is back
    gc.collect()
    assert not [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.grad_fn is not None]


def _retention(accuracy: float, n: int, count: int = 512) -> dict:
    return {"memory": {"accuracy": accuracy, "n": n, "per_distance": {1: accuracy}, "counts": {1: n}},
            "reset": {"accuracy": 0.05, "n": n, "per_distance": {1: 0.05}, "counts": {1: n}},
            "dialogues": {"count": count, "max_distance": 8, "seed": 2, "split": "heldout"}}


def test_retention_tables_say_what_they_measured_and_call_noise_noise():
    from transformers_rxt.training import compare_retention, describe_retention

    assert describe_retention(_retention(0.3, 1300)) == (
        "512 heldout dialogues, fact-question distances 1-8, corpus seed 2; 1,300 recall questions")
    small = compare_retention(_retention(0.325, 1300), _retention(0.342, 1300), ("stage4", "stage5"))
    assert small.startswith("[512 heldout dialogues") and "stage4 |   stage5 |    reset" in small
    assert small.endswith("change in recall, stage4 -> stage5: +0.017 (95% noise band +-0.037: within noise)")
    assert compare_retention(_retention(0.30, 5000), _retention(0.36, 5000)).endswith("a gain)")
    assert compare_retention(_retention(0.36, 5000), _retention(0.30, 5000)).endswith("a loss)")
    with pytest.raises(ValueError, match="cannot compare retention on different dialogues"):
        compare_retention(_retention(0.3, 100, count=64), _retention(0.3, 100))


def test_review_loss_reads_the_memory_of_the_earlier_turns_and_trains_its_writes(tok):
    records = build_memory_dialogues(4, max_distance=3, seed=2, num_turns=4, fact_rate=1.0, reviews=True)
    ds = tokenize_mrl_dataset(records, tok, 64)
    batch = DataCollatorForRxTEpisodes.from_tokenizer(tok)([ds[i] for i in range(4)])
    model = make_model(tok, seed=5)
    plain_batch = {k: v for k, v in batch.items() if not k.startswith("review_")}
    outputs = {}
    for weight in (0.0, 0.5):
        module = RxTForMemoryAwareTraining.from_rxt(
            model, MemoryAwareConfig(output_dir="x", use_cpu=True, backprop_turns=0, review_loss_weight=weight))
        outputs[weight] = module(**batch, generator=torch.Generator().manual_seed(0))
    plain = module(**plain_batch, generator=torch.Generator().manual_seed(0))
    assert float(outputs[0.0].loss.detach()) == float(plain.loss.detach())  # weight 0: the reviews are not read
    # the review at turn k is answered from the memory after turns 0 .. k-1 were written, by hand:
    with torch.no_grad():
        stm, review_losses = model.initial_memory_tensor(4, generator=torch.Generator().manual_seed(0)), []
        for k in range(1, 5):
            stm = compute_memory_update(module, batch["input_ids"][:, k - 1], batch["attention_mask"][:, k - 1], stm,
                                        batch["turn_mask"][:, k - 1].bool())
            rows = batch["review_mask"][:, k].bool()
            if rows.any():
                out = model(input_ids=batch["review_input_ids"][rows, k], stm=stm[rows],
                            attention_mask=batch["review_attention_mask"][rows, k],
                            labels=batch["review_labels"][rows, k])
                review_losses.append(out.loss)
    expected_review = float(torch.stack(review_losses).mean())
    assert float(outputs[0.5].metrics["review_loss"]) == pytest.approx(expected_review, rel=1e-5)
    total = float(plain.loss.detach()) + 0.5 * expected_review
    assert float(outputs[0.5].loss.detach()) == pytest.approx(total, rel=1e-5)
    # With only turn 0 trained (it reads the initial memory), the memory attention gets a gradient only
    # through the review after the last turn, which reads what every write of the episode left.
    only_turn_0 = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    only_turn_0["labels"][:, 0] = batch["labels"][:, 0]
    for review_at_end in (False, True):
        mask = torch.zeros_like(batch["review_mask"])
        if review_at_end:
            mask[:, 4] = batch["review_mask"][:, 4]
        model.zero_grad(set_to_none=True)
        module(**{**only_turn_0, "review_mask": mask}, generator=torch.Generator().manual_seed(0)).loss.backward()
        written = sum(float(p.grad.abs().sum()) for p in model.memory_attention.parameters() if p.grad is not None)
        assert (written > 0) == review_at_end


def test_review_loss_weight_without_reviews_is_refused_before_training(tok, episodes, tmp_path):
    args = MemoryAwareConfig(**common_args(tmp_path, max_steps=1, review_loss_weight=1.0))
    with pytest.raises(ValueError, match=r"review_loss_weight=1.0 but the training episodes have no reviews"):
        MemoryAwareTrainer(make_model(tok), args, train_dataset=episodes, processing_class=tok)
    with pytest.raises(ValueError, match="review_loss_weight must be >= 0"):
        MemoryAwareConfig(**common_args(tmp_path, review_loss_weight=-1.0))


def test_write_token_loss_asks_the_fresh_slots_for_the_interactions_words(tok):
    """`write_token_loss_weight`: after every FIFO write, each memory layer's fresh slots (RMS-normalised, a mixture
    over the slots) score the vocabulary through the shared token embedding, and the loss is the mean -log p of
    the written interaction's distinct non-special tokens, for the episodes whose next turn reads the write;
    checked by hand on one batch of episodes of different lengths. It trains the write
    (memory attention) even where no answer is trained, and weight 0 leaves the loss as it was."""
    fifo = dict(use_gated_residual=True, residual_gate_type="elementwise", residual_gate_slot_status_type="linear",
                use_tanh_residual_gate=False, fifo_write_slots=2)
    model = make_model(tok, memory=fifo, stm_init_type="learned")
    ds = tokenize_mrl_dataset(build_memory_dialogues(4, max_distance=3, seed=3), tok, 64)
    features = [dict(ds[i]) for i in range(4)]
    for row, turns in ((1, 2), (2, 3)):  # episodes of 2, 3 and 4 turns
        features[row] = {**features[row], "turn_input_ids": features[row]["turn_input_ids"][:turns],
                         "turn_labels": features[row]["turn_labels"][:turns]}
    batch = DataCollatorForRxTEpisodes.from_tokenizer(tok)(features)
    assert batch["turn_mask"].sum(dim=1).tolist() == [4, 2, 3, 4]
    out = {}
    for weight in (0.0, 0.5):
        module = RxTForMemoryAwareTraining.from_rxt(
            model, MemoryAwareConfig(output_dir="x", use_cpu=True, backprop_turns=0, write_token_loss_weight=weight))
        out[weight] = module(**batch, generator=torch.Generator().manual_seed(0))
    assert "write_token_loss" not in out[0.0].metrics
    special = {tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():
        stm, per_turn = model.initial_memory_tensor(4), []
        for k in range(batch["input_ids"].shape[1] - 1):
            rows = batch["turn_mask"][:, k].bool()
            stm = compute_memory_update(module, batch["input_ids"][:, k], batch["attention_mask"][:, k], stm, rows)
            read = rows & batch["turn_mask"][:, k + 1].bool()  # an episode's last write is read by nothing
            row_losses = []
            for r in read.nonzero().flatten().tolist():
                words = {int(t) for t, m in zip(batch["input_ids"][r, k], batch["attention_mask"][r, k]) if m} - special
                for layer in range(stm.shape[1]):
                    slots = stm[r, layer, :2]
                    slots = slots / slots.pow(2).mean(-1, keepdim=True).add(torch.finfo(slots.dtype).eps).sqrt()
                    p = torch.softmax(slots @ embedding.T, dim=-1).mean(0)  # the mixture of the two fresh slots
                    row_losses.append(-torch.log(p[sorted(words)]).mean())
            if row_losses:
                per_turn.append(torch.stack(row_losses).mean())
    expected = float(torch.stack(per_turn).mean())
    assert float(out[0.5].metrics["write_token_loss"]) == pytest.approx(expected, rel=1e-4)
    assert float(out[0.5].loss.detach()) == pytest.approx(float(out[0.0].loss.detach()) + 0.5 * expected, rel=1e-5)
    no_answers = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    no_answers["labels"][:, 0] = batch["labels"][:, 0]  # only turn 0, which reads the initial memory
    model.zero_grad(set_to_none=True)
    module(**no_answers, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.memory_attention.parameters() if p.grad is not None) > 0


def test_write_token_loss_needs_a_fifo_memory_and_a_non_negative_weight(tok, episodes, tmp_path):
    with pytest.raises(ValueError, match="write_token_loss_weight must be >= 0"):
        MemoryAwareConfig(**common_args(tmp_path, write_token_loss_weight=-0.1))
    args = MemoryAwareConfig(**common_args(tmp_path, max_steps=1, write_token_loss_weight=0.1))
    with pytest.raises(ValueError, match=r"write_token_loss_weight=0.1 scores the slots a FIFO write fills"):
        MemoryAwareTrainer(make_model(tok), args, train_dataset=episodes, processing_class=tok)
