"""Stage 5: IMPO (memory RL) and DMPO (memory-aware DPO) on tiny models (CPU, seconds)."""

import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from rxt_factories import tiny_model  # noqa: E402

from transformers_rxt.training.dmpo import (  # noqa: E402
    DataCollatorForDMPO,
    DMPOConfig,
    DMPOTrainer,
    _episode_scores,
    dmpo_loss,
)
from transformers_rxt.training.impo import (  # noqa: E402
    IMPOConfig,
    IMPOTrainer,
    clipped_policy_loss,
    interstep_kl,
    reference_kl,
    stm_difference_loss,
    trainable_by_mode,
)


def _turn(g, vocab=96):
    q = torch.randint(11, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    a = torch.randint(11, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    return [2, 5] + q + [6] + a + [3]


def episodes(n, turns=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_list([{"turn_input_ids": [_turn(g) for _ in range(turns)]} for _ in range(n)])


def impo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                curriculum_steps=2, max_completion_length=6, logging_steps=1, learning_rate=1e-3, seed=0)
    base.update(kw)
    return IMPOConfig(**base)


# ------------------------------------------------------------------------------------------ loss terms by hand
def test_clipped_policy_loss_by_hand():
    old = torch.zeros(2, 2)
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.0]]))  # ratios
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, frac = clipped_policy_loss(logp, old, adv, mask, epsilon=0.2)
    # row 0 (A=+1): min(1.5, 1.2)=1.2, min(0.9, 0.9)=0.9 -> -(2.1)/2; row 1 (A=-2): min(-1.0, -1.6) = -1.6 -> 1.6
    expected = (-(1.2 + 0.9) / 2 + 1.6) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert frac.item() == pytest.approx(2 / 3)  # 1.5 and 0.5 are outside [0.8, 1.2]


def test_reference_kl_and_interstep_kl_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    kl = reference_kl(logp, ref, torch.tensor([[1, 1]]))
    d = math.log(0.5)  # ref - logp on the first token
    assert kl.item() == pytest.approx(((math.exp(d) - d - 1) + 0.0) / 2, abs=1e-6)
    p = torch.tensor([[[0.7, 0.3]]])
    q = torch.tensor([[[0.5, 0.5]]])
    kl2 = interstep_kl(torch.log(p), torch.log(q), torch.ones(1, 1), torch.ones(1, 1))
    assert kl2.item() == pytest.approx(0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5), abs=1e-6)
    # identical distributions: zero
    assert interstep_kl(torch.log(p), torch.log(p), torch.ones(1, 1), torch.ones(1, 1)).item() == pytest.approx(0)


def test_stm_difference_regularizer_by_hand():
    before = torch.zeros(1, 1, 2, 2)
    after = torch.ones(1, 1, 2, 2) * 2.0
    assert stm_difference_loss(after, before, step=4).item() == pytest.approx(2.0 * 4.0)  # sqrt(4) * MSE(=4)


def test_dmpo_loss_by_hand():
    z = 0.5 * ((1.0 - 0.0) - (0.2 - 0.0))
    got = dmpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.2]), torch.tensor([0.0]), beta=0.5)
    assert got.item() == pytest.approx(-math.log(1 / (1 + math.exp(-z))), abs=1e-6)
    smooth = dmpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.2]), torch.tensor([0.0]), 0.5, 0.1)
    assert smooth.item() == pytest.approx(0.9 * got.item() - 0.1 * math.log(1 / (1 + math.exp(z))), abs=1e-6)


def test_freezing_modes():
    assert trainable_by_mode("rxt.memory_attention.x", "warmup")
    assert not trainable_by_mode("rxt.decoder.layers.0.memory_cross_attention.q.weight", "warmup")
    assert trainable_by_mode("rxt.decoder.layers.0.memory_cross_attention.q.weight", "fetch")
    assert trainable_by_mode("rxt.decoder.layers.0.stm_norm.weight", "fetch")
    assert not trainable_by_mode("rxt.decoder.layers.0.ff.w1.weight", "fetch")
    assert not trainable_by_mode("rxt.encoder.layers.0.ff.w1.weight", "fetch")
    assert trainable_by_mode("rxt.encoder.layers.0.ff.w1.weight", "update")
    assert trainable_by_mode("rxt.embed_tokens.weight", "all")
    assert trainable_by_mode("critic.value.weight", "warmup")


# ------------------------------------------------------------------------------------------ trainer
def test_impo_two_steps_finite_losses_and_terms_logged(tmp_path):
    calls = []

    def length_reward(prompts, completions, completion_ids, **kwargs):  # TRL reward-function protocol
        calls.append((len(prompts), kwargs["step"]))
        return [min(len(c), 4) / 4 for c in completion_ids]

    model = tiny_model()
    args = impo_args(tmp_path, max_steps=2, unfreeze_schedule="0:fetch,1:all")
    trainer = IMPOTrainer(model, args, train_dataset=episodes(8), reward_funcs=[length_reward])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in ("loss", "policy_loss", "value_loss", "entropy", "kl_ref", "kl_interstep", "stm_diff", "reward",
                "reward_step1", "reward_step2", "clip_fraction", "reward_funcs_step1", "time_share_generation",
                "episodes_per_second"):
        assert key in logs[0], key
        assert math.isfinite(logs[0][key]), key
    assert calls == [(4, 1), (4, 2), (4, 1), (4, 2)]
    # step 0 was "fetch": the decoder feed-forward must not move at step 0; it moves once unfrozen (step 1)
    ff = "rxt.decoder.layers.0.ff.w1.weight" if "rxt.decoder.layers.0.ff.w1.weight" in before else next(
        n for n in before if n.startswith("rxt.decoder.layers.0.ff"))
    assert not torch.equal(before[ff], dict(model.named_parameters())[ff])
    assert not torch.equal(before["rxt.memory_attention." + next(iter(model.memory_attention.state_dict()))],
                           model.memory_attention.state_dict()[next(iter(model.memory_attention.state_dict()))])


def test_impo_fetch_mode_keeps_decoder_body_frozen(tmp_path):
    model = tiny_model()
    trainer = IMPOTrainer(model, impo_args(tmp_path, unfreeze_schedule="0:fetch", advantage_estimator="batch"),
                          train_dataset=episodes(4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    after = dict(model.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("memory_cross_attention" in n for n in moved)
    assert not any(n.startswith("rxt.encoder.") or ".ff." in n or n.startswith("rxt.embed_tokens") for n in moved)


def test_rollout_carries_memory_and_resets(tmp_path):
    model = tiny_model()
    trainer = IMPOTrainer(model, impo_args(tmp_path, curriculum_steps=2, advantage_estimator="batch"),
                          train_dataset=episodes(4))
    batch = trainer.data_collator([episodes(4)[i] for i in range(4)])
    out = trainer.collect_rollout(batch)
    s1, s2 = out["steps"]
    # step 2's pre-step memory = step 1's pre-step memory + the first interaction (so it differs), and the
    # interaction written before step 2 is step 1's generated one: [BOS][Q]query_1[A]answer[EOS]
    assert not torch.allclose(s1["prev_memory"], s2["prev_memory"])
    assert s1["prev_valid"].all() and s2["prev_valid"].all()  # 3-turn episodes: every row writes every turn
    expect = model.compute_memory_update(s1["prev_ids"], s1["prev_mask"], s1["prev_memory"])
    assert torch.equal(s2["prev_memory"], expect)

    def generated_interaction(step):
        prompt_len = step["sequences"].shape[1] - step["completion_ids"].shape[1]
        return model.interactions_from_generation(step["sequences"], prompt_len, step["sequence_mask"][:, :prompt_len])

    assert all(torch.equal(a, b) for a, b in zip((s2["prev_ids"], s2["prev_mask"]), generated_interaction(s1)))
    # step 2 answered from `again`; the memory carried to the next batch adds step 2's own interaction
    again = model.compute_memory_update(s2["prev_ids"], s2["prev_mask"], expect)
    assert torch.equal(trainer._carried["actor"], model.compute_memory_update(*generated_interaction(s2), again))
    # always-reset: a new batch starts from a fresh memory, not the carried one
    trainer.args.random_resets_ratio = 1.0
    out2 = trainer.collect_rollout(batch)
    assert out2["metrics"]["memory_resets"] == 1.0
    # never-reset: the next episode starts from the memory the previous one left
    trainer.args.random_resets_ratio = 0.0
    carried = trainer._carried["actor"].clone()
    out3 = trainer.collect_rollout(batch)
    assert out3["metrics"]["memory_resets"] == 0.0
    assert torch.allclose(out3["steps"][0]["prev_memory"], carried)


def test_reference_memory_is_its_own(tmp_path):
    model = tiny_model()
    ref = tiny_model(seed=1)
    trainer = IMPOTrainer(model, impo_args(tmp_path, curriculum_steps=1, advantage_estimator="batch"),
                          train_dataset=episodes(4), ref_model=ref)
    batch = trainer.data_collator([episodes(4)[i] for i in range(4)])
    torch.manual_seed(0)
    out = trainer.collect_rollout(batch)
    s = out["steps"][0]
    ref_mem = ref.compute_memory_update(s["prev_ids"], s["prev_mask"], s["prev_memory"])
    logits = ref(input_ids=s["sequences"], attention_mask=s["sequence_mask"], stm=ref_mem,
                 logits_to_keep=s["completion_ids"].shape[1] + 1).logits[:, :-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, s["completion_ids"][..., None])[..., 0]
    assert torch.allclose(s["ref_logp"], want, atol=1e-5)


# ------------------------------------------------------------------------------------------ DMPO
def dmpo_dataset(n=4, turns=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        acc = [_turn(g) for _ in range(turns)]
        rej = [t[: t.index(6) + 1] + torch.randint(11, 96, (3,), generator=g).tolist() + [3] for t in acc]
        rows.append({"turn_input_ids": acc, "rejected_turn_input_ids": rej})
    return datasets.Dataset.from_list(rows)


def test_dmpo_loss_decreases_on_fixed_batch(tmp_path):
    model = tiny_model()
    ds = dmpo_dataset(4)
    args = DMPOConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, use_cpu=True,
                      learning_rate=3e-3, logging_steps=1, beta=0.5, seed=0)
    trainer = DMPOTrainer(model, args, train_dataset=ds)
    trainer.train()
    losses = [h["dpo_loss"] for h in trainer.state.log_history if "dpo_loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.01
    assert all(math.isfinite(x) for x in losses)


def test_dmpo_accepted_answer_not_in_memory_while_scoring(tmp_path):
    model = tiny_model()
    ds = dmpo_dataset(2)
    trainer = DMPOTrainer(model, DMPOConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=1),
                          train_dataset=ds)
    collate = DataCollatorForDMPO(trainer.data_collator.episodes)
    batch = collate([ds[0], ds[1]])
    gen = torch.Generator().manual_seed(0)
    inputs = trainer.prepare_stage_inputs(dict(batch), gen)
    rows = dict(inputs)
    # change the accepted answer of turn 1 only: the rejected score of turn 1 must not change (no leak),
    # while the turn-2 scores may (the accepted turn 1 is in memory by then).
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    p = int(changed["prompt_lengths"][0, 1])
    changed["input_ids"][0, 1, p] = 11 if int(changed["input_ids"][0, 1, p]) != 11 else 12
    module = trainer.model
    with torch.no_grad():
        out = module(**rows)
        s_a = _episode_scores(module, batch, inputs["init_memory"], ["", "rejected_"], True)
        s_b = _episode_scores(module, changed, inputs["init_memory"], ["", "rejected_"], True)
    assert torch.equal(s_a["rejected_"][:, :2], s_b["rejected_"][:, :2])
    assert not torch.equal(s_a["rejected_"][0, 2], s_b["rejected_"][0, 2])  # written after scoring turn 1
    assert out.loss.isfinite()


def test_dmpo_rpo_term_adds_alpha_times_accepted_nll(tmp_path):
    model = tiny_model()
    ds = dmpo_dataset(2)
    losses = {}
    for alpha in (None, 0.5):
        trainer = DMPOTrainer(model, DMPOConfig(output_dir=str(tmp_path), use_cpu=True, max_steps=1, rpo_alpha=alpha),
                              train_dataset=ds)
        batch = DataCollatorForDMPO(trainer.data_collator.episodes)([ds[0], ds[1]])
        inputs = trainer.prepare_stage_inputs(dict(batch), torch.Generator().manual_seed(0))
        with torch.no_grad():
            losses[alpha] = trainer.model(**dict(inputs))
            scores = _episode_scores(trainer.model, batch, inputs["init_memory"], [""], True)[""]
    valid = batch["turn_mask"].float()
    nll = -(scores * valid).sum() / valid.sum()
    assert losses[0.5].metrics["nll_accepted"] == pytest.approx(float(nll), abs=1e-5)
    assert float(losses[0.5].loss) == pytest.approx(float(losses[None].loss) + 0.5 * float(nll), abs=1e-5)


def test_group_advantages_compare_the_samples_of_one_episode(tmp_path):
    model = tiny_model()
    args = impo_args(tmp_path, advantage_estimator="group", num_generations=4, random_resets_ratio=0.0)
    trainer = IMPOTrainer(model, args, train_dataset=episodes(4))
    batch = trainer.data_collator([episodes(4)[i] for i in range(2)])
    out = trainer.collect_rollout(batch)
    for step in out["steps"]:
        assert step["advantages"].shape == (8,)  # 2 episodes x 4 samples
        per_episode = step["advantages"].view(2, 4).sum(-1)
        assert torch.allclose(per_episode, torch.zeros(2), atol=1e-5)  # centred within each episode's group
    # the 4 samples of an episode start from the same memory: a fresh one, then (never reset) the memory the
    # group's first sample left, although the samples' answers, and so their final memories, differ
    first = out["steps"][0]["prev_memory"].view(2, 4, *out["steps"][0]["prev_memory"].shape[1:])
    assert torch.equal(first[:, 0], first[:, 3]) and not torch.equal(first[0, 0], first[1, 0])
    left = trainer._carried["actor"].clone()
    assert not torch.equal(left[0], left[1])
    again = trainer.collect_rollout(batch)
    assert again["metrics"]["memory_resets"] == 0.0
    assert torch.equal(again["steps"][0]["prev_memory"], left[::4].repeat_interleave(4, 0))


def test_long_range_topic_change_rewards_not_repeating_the_saved_data(tmp_path):
    trainer = IMPOTrainer(tiny_model(), impo_args(tmp_path, strategy="long_range", advantage_estimator="batch"),
                          train_dataset=episodes(4))
    comp = torch.tensor([[11, 12, 13, 3], [20, 21, 22, 3]])
    saved = torch.tensor([[11, 12, 13, 3], [11, 12, 13, 3]])
    mask = torch.ones_like(comp)
    _, plain = trainer._reward(1, comp, mask, comp, mask, saved, mask, negative=False)
    _, topic_change = trainer._reward(1, comp, mask, comp, mask, saved, mask, negative=True)
    assert float(plain["bleu_saved"]) > 0
    assert float(topic_change["bleu_saved"]) == pytest.approx(1 - float(plain["bleu_saved"]))


def test_impo_curriculum_driver_runs_its_stages_in_order(tmp_path):
    from transformers_rxt.training.impo import IMPOStage, exponential_schedule, run_impo_curriculum

    assert [s.steps for s in exponential_schedule(10, longest=8)] == [1, 2, 4, 8]
    model = tiny_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stages = [IMPOStage(steps=1, max_steps=1, unfreeze_schedule="0:fetch"),
              IMPOStage(steps=2, max_steps=1, strategy="long_range", random_resets_ratio=0.0)]
    results = run_impo_curriculum(model, stages, impo_args(tmp_path), train_dataset=episodes(8),
                                  output_dir=str(tmp_path / "curriculum"))
    assert [(r["stage"], r["steps"]) for r in results] == [(0, 1), (1, 2)]
    assert "reward_step1" in results[0] and "reward_step2" in results[1] and "reward_step2" not in results[0]
    assert (tmp_path / "curriculum" / "stage1_steps2" / "config.json").is_file()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
