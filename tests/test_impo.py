"""Stage 5: IMPO (memory RL) and DMPO (memory-aware DPO) on tiny models (CPU, seconds)."""

import math

import pytest
import torch

datasets = pytest.importorskip("datasets")
pytest.importorskip("trl")

from rxt_factories import story_tokenizer, tiny_model  # noqa: E402

from transformers_rxt.metrics import TensorBLEUReward  # noqa: E402
from transformers_rxt.training.dmpo import (  # noqa: E402
    DMPOConfig,
    DMPOTrainer,
)
from transformers_rxt.training.impo import (  # noqa: E402
    IMPOConfig,
    IMPOTrainer,
    TopicChangeReward,
    clipped_policy_loss,
    interstep_kl,
    masked_mean,
    reference_kl,
    stm_difference_loss,
    trainable_by_mode,
)

VOCAB = 300  # the smallest byte-level BPE vocabulary (256 bytes + specials + merges); ids below 96 are used


@pytest.fixture(scope="module")
def tok():
    return story_tokenizer(VOCAB)


def model(seed=0):
    return tiny_model(seed=seed, vocab=VOCAB)


def _turn(g, vocab=96):
    q = torch.randint(11, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    a = torch.randint(11, vocab, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
    return [2, 5] + q + [6] + a + [3]


def episodes(n, turns=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_list([{"turn_input_ids": [_turn(g) for _ in range(turns)]} for _ in range(n)])


def impo_args(tmp_path, **kw):
    """The previous IMPO trainer's defaults (a critic, one sample per episode) on 4 episodes per step."""
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                curriculum_steps=2, max_completion_length=6, logging_steps=1, learning_rate=1e-3, seed=0,
                advantage_estimator="critic", num_generations=1, report_to="none", save_strategy="no")
    base.update(kw)
    return IMPOConfig(**base)


def impo(tmp_path, tok, args=None, train=None, **kw):
    return IMPOTrainer(kw.pop("model", None) or model(), args=args or impo_args(tmp_path),
                       train_dataset=train if train is not None else episodes(4), processing_class=tok, **kw)


def test_stage5_trainers_are_trl_trainers():
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer

    assert issubclass(IMPOTrainer, GRPOTrainer) and issubclass(IMPOConfig, GRPOConfig)
    assert issubclass(DMPOTrainer, DPOTrainer) and issubclass(DMPOConfig, DPOConfig)


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
    # per-row steps (TRL's batch mixes the steps of the episodes): the mean of each row's sqrt(k) * MSE
    rows = torch.stack([torch.ones(1, 2, 2), torch.ones(1, 2, 2) * 2.0])
    got = stm_difference_loss(rows, torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 4.0]))
    assert got.item() == pytest.approx((1.0 * 1.0 + 2.0 * 4.0) / 2)


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


# ------------------------------------------------------------------------------------------ IMPO trainer
def test_impo_loss_is_trls_grpo_loss_plus_the_impo_terms(tmp_path, tok):
    """TRL's loss (loss_type 'grpo': clipped policy term, beta x k3 KL to the reference, entropy bonus) on the
    memory-conditioned log-probs, plus stm_diff_coef x the memory regulariser and vf_coef x the value loss,
    equals the IMPO objective computed by hand from the stage module's outputs."""
    args = impo_args(tmp_path, beta=0.05, entropy_coef=0.01, stm_diff_coef=0.3, vf_coef=0.7)
    trainer = impo(tmp_path, tok, args)
    rows = [episodes(4)[i] for i in range(4)]
    inputs = trainer._generate_and_score_completions(rows)
    assert inputs["prompt_ids"].shape[0] == 2 * 4  # one row per (follow-up step, episode)
    trainer.model.eval()  # no gradient-accumulation scaling
    loss = trainer.compute_loss(trainer.model, inputs)
    width = inputs["completion_ids"].shape[1]
    out = trainer.model(input_ids=torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
                        attention_mask=torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
                        logits_to_keep=width, **{k: inputs[k] for k in IMPOTrainer._MODULE_KEYS if k in inputs})
    mask = inputs["completion_mask"] * inputs["tool_mask"]
    policy, _ = clipped_policy_loss(out.log_probs, out.log_probs.detach(), inputs["advantages"], mask, 0.2)
    kl = reference_kl(out.log_probs, inputs["ref_per_token_logps"], mask)
    expected = (policy + 0.05 * kl - 0.01 * masked_mean(out.entropy, mask) + 0.3 * out.stm_diff
                + 0.7 * out.value_loss)
    assert out.stm_diff.detach() > 0 and out.value_loss.detach() > 0 and float(kl.detach()) == pytest.approx(0, abs=1e-5)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_num_iterations_reuses_memory_conditioned_old_log_probs(tmp_path, tok):
    """TRL's multi-iteration GRPO (num_iterations=2): one rollout serves two optimizer steps, and the policy ratio
    is taken against the rollout's stored per-token log-probs. Those are read from each row's memory (other
    memories give other log-probs); the ratio is 1 in the first iteration (the rollout's policy is the current
    one) and differs from 1 in the second (one update later), so the clip acts on it."""
    args = impo_args(tmp_path, max_steps=2, num_iterations=2, num_generations=2, advantage_estimator="group",
                     beta=0.0, learning_rate=1e-2)
    trainer = impo(tmp_path, tok, args, train=episodes(8))
    assert trainer._needs_old_logps()
    seen = []
    forward = trainer._get_per_token_logps_and_entropies

    def recording(model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        logps, entropy, aux = forward(model, input_ids, attention_mask, logits_to_keep, *a, **kw)
        inputs = trainer._impo_inputs
        keys = {k: inputs[k] for k in IMPOTrainer._MODULE_KEYS if k in inputs}
        fresh = trainer.accelerator.unwrap_model(model).init_memory(input_ids.shape[0],
                                                                    generator=torch.Generator().manual_seed(7))
        with torch.no_grad():  # the same rows and weights, read from other (fresh) memories
            other = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=logits_to_keep,
                          **{**keys, "prev_memory": fresh.memory}).log_probs
        seen.append(dict(logps=logps.detach(), old=inputs["old_per_token_logps"], other=other, ids=input_ids,
                         loss_mask=inputs["completion_mask"].bool()))
        return logps, entropy, aux

    trainer._get_per_token_logps_and_entropies = recording
    trainer.train()
    first, second = seen
    assert torch.equal(first["old"], second["old"]) and torch.equal(first["ids"], second["ids"])  # one rollout
    ratio_1 = torch.exp(first["logps"] - first["old"])[first["loss_mask"]]
    ratio_2 = torch.exp(second["logps"] - second["old"])[second["loss_mask"]]
    torch.testing.assert_close(ratio_1, torch.ones_like(ratio_1), rtol=0, atol=1e-5)
    assert float((ratio_2 - 1).abs().max()) > 1e-3
    # the stored log-probs are the memory's: the same rows and weights read from fresh memories score otherwise
    assert float((first["other"] - first["old"])[first["loss_mask"]].abs().max()) > 1e-3


def test_impo_two_steps_finite_losses_and_terms_logged(tmp_path, tok):
    calls = []

    def length_reward(prompts, completions, completion_ids, **kwargs):  # TRL reward-function protocol
        assert "turn_input_ids" in kwargs and "trainer_state" in kwargs  # dataset columns, as in TRL
        assert kwargs["references"] and kwargs["reference_ids"]
        calls.append((len(prompts), kwargs["step"][0]))
        return [min(len(c), 4) / 4 for c in completion_ids]

    m = model()
    args = impo_args(tmp_path, max_steps=2, unfreeze_schedule="0:fetch,1:all", interstep_kl_coef=0.01,
                     reward_weights=[0.5, 1.0], log_completions=True, num_completions_to_print=2)
    trainer = impo(tmp_path, tok, args, train=episodes(8), model=m,
                   reward_funcs=[TensorBLEUReward("reference_ids"), length_reward])
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in ("loss", "policy_loss", "value_loss", "entropy", "kl", "kl_interstep", "stm_diff", "reward",
                "reward_step1", "reward_step2", "clip_ratio/region_mean", "rewards/length_reward/mean",
                "rewards/tensorbleu/mean", "time_share_generation", "episodes_per_second"):
        assert key in logs[0], key
        assert math.isfinite(logs[0][key]), key
    assert calls == [(4, 1), (4, 2), (4, 1), (4, 2)]
    # TRL's completion log: one row per (step, episode) with the prompt, completion, rewards and advantage
    import pandas as pd

    table = pd.read_parquet(tmp_path / "completions" / "completions_00002.parquet")
    assert {"prompt", "completion", "tensorbleu", "length_reward", "advantage"} <= set(table.columns)
    assert len(table) == 8
    # step 0 was "fetch": the decoder feed-forward must not move at step 0; it moves once unfrozen (step 1)
    ff = next(n for n in before if n.startswith("rxt.decoder.layers.0.ff"))
    assert not torch.equal(before[ff], dict(m.named_parameters())[ff])
    mem = next(n for n in before if n.startswith("rxt.memory_attention."))
    assert not torch.equal(before[mem], dict(m.named_parameters())[mem])


def test_impo_fetch_mode_keeps_decoder_body_frozen(tmp_path, tok):
    m = model()
    trainer = impo(tmp_path, tok, impo_args(tmp_path, unfreeze_schedule="0:fetch", advantage_estimator="batch"),
                   model=m)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    trainer.train()
    after = dict(m.named_parameters())
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert any("memory_cross_attention" in n for n in moved)
    assert not any(n.startswith("rxt.encoder.") or ".ff." in n or n.startswith("rxt.embed_tokens") for n in moved)


def _generated_interaction(m, step):
    seqs = torch.cat([step["prompt_ids"], step["completion_ids"]], 1)
    return m.interactions_from_generation(seqs, step["prompt_ids"].shape[1], step["prompt_mask"])


def test_rollout_carries_memory_and_resets(tmp_path, tok):
    m = model()
    trainer = impo(tmp_path, tok, impo_args(tmp_path, curriculum_steps=2, advantage_estimator="batch"), model=m)
    batch = trainer.episode_collator([episodes(4)[i] for i in range(4)])
    s1, s2 = trainer.collect_rollout(batch)
    # step 2's pre-step memory = step 1's pre-step memory + the first interaction (so it differs), and the
    # interaction written before step 2 is step 1's generated one: [BOS][Q]query_1[A]answer[EOS]
    assert not torch.allclose(s1["prev_memory"], s2["prev_memory"])
    assert s1["prev_valid"].all() and s2["prev_valid"].all()  # 3-turn episodes: every row writes every turn
    expect = m.compute_memory_update(s1["prev_ids"], s1["prev_mask"], s1["prev_memory"])
    assert torch.equal(s2["prev_memory"], expect)
    assert all(torch.equal(a, b) for a, b in zip((s2["prev_ids"], s2["prev_mask"]), _generated_interaction(m, s1)))
    # step 2 answered from `again`; the memory carried to the next batch adds step 2's own interaction
    again = m.compute_memory_update(s2["prev_ids"], s2["prev_mask"], expect)
    assert torch.equal(trainer._carried["actor"], m.compute_memory_update(*_generated_interaction(m, s2), again))
    # always-reset: a new batch starts from a fresh memory, not the carried one
    trainer.args.random_resets_ratio = 1.0
    assert trainer.collect_rollout(batch)[0]["memory_resets"] == 1.0
    # never-reset: the next episode starts from the memory the previous one left
    trainer.args.random_resets_ratio = 0.0
    carried = trainer._carried["actor"].clone()
    again = trainer.collect_rollout(batch)
    assert again[0]["memory_resets"] == 0.0
    assert torch.allclose(again[0]["prev_memory"], carried)
    # TRL's batch: the rows of a step read the memory the rollout left for them
    rows = trainer._generate_and_score_completions([episodes(4)[i] for i in range(4)])
    assert rows["prev_memory"].shape[0] == 8 and torch.equal(rows["step_index"], torch.tensor([1.0] * 4 + [2.0] * 4))


def test_resume_continues_with_the_carried_memory_of_the_uninterrupted_run(tmp_path, tok):
    """With random_resets_ratio < 1 the memory a batch leaves is carried into the next one: it is saved next to
    every checkpoint, so a run resumed from checkpoint-2 continues with the same memory (and so the same
    rollouts, rewards and updates) as the run that was not interrupted."""
    from safetensors.torch import load_file

    def run(out, max_steps, resume=None):
        args = impo_args(out, max_steps=max_steps, per_device_train_batch_size=4, num_generations=2, beta=0.05,
                         advantage_estimator="group", random_resets_ratio=0.0, save_strategy="steps", save_steps=1)
        trainer = impo(out, tok, args, train=episodes(16))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run(tmp_path / "full", 3)
    saved = load_file(str(tmp_path / "full" / "checkpoint-2" / "impo_carried_memory-0.safetensors"))
    assert set(saved) == {"actor", "ref"} and saved["actor"].shape[0] == 4
    resumed = run(tmp_path / "resumed", 3, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert torch.equal(resumed._carried["actor"], full._carried["actor"])
    assert torch.equal(resumed._carried["ref"], full._carried["ref"])
    full_params = dict(full.model.named_parameters())
    assert all(torch.equal(p, full_params[n]) for n, p in resumed.model.named_parameters())
    # the resumed history is the checkpoint's two steps and the third step again, the same rewards
    reward = [h["reward"] for h in full.state.log_history if "reward" in h]
    assert len(reward) == 3 and [h["reward"] for h in resumed.state.log_history if "reward" in h] == reward
    # without the saved memory the resumed run starts its episodes from fresh memories: another run
    (tmp_path / "full" / "checkpoint-2" / "impo_carried_memory-0.safetensors").unlink()
    fresh = run(tmp_path / "fresh", 3, resume=str(tmp_path / "full" / "checkpoint-2"))
    assert not torch.equal(fresh._carried["actor"], full._carried["actor"])


def test_reference_memory_is_its_own(tmp_path, tok):
    m, ref = model(), model(seed=1)
    trainer = impo(tmp_path, tok, impo_args(tmp_path, curriculum_steps=1, advantage_estimator="batch"), model=m,
                   ref_model=ref)
    batch = trainer.episode_collator([episodes(4)[i] for i in range(4)])
    (s,) = trainer.collect_rollout(batch)
    ref_mem = ref.compute_memory_update(s["prev_ids"], s["prev_mask"], s["prev_memory"])
    seqs = torch.cat([s["prompt_ids"], s["completion_ids"]], 1)
    logits = ref(input_ids=seqs, attention_mask=torch.cat([s["prompt_mask"], s["completion_mask"]], 1), stm=ref_mem,
                 logits_to_keep=s["completion_ids"].shape[1] + 1).logits[:, :-1]
    want = torch.log_softmax(logits.float(), -1).gather(-1, s["completion_ids"][..., None])[..., 0]
    assert torch.allclose(s["ref_per_token_logps"], want, atol=1e-5)


def test_group_advantages_compare_the_samples_of_one_episode(tmp_path, tok):
    args = impo_args(tmp_path, advantage_estimator="group", num_generations=4, random_resets_ratio=0.0,
                     per_device_train_batch_size=8)
    trainer = impo(tmp_path, tok, args)
    rows = [episodes(4)[i] for i in range(2) for _ in range(4)]  # TRL's sampler: each episode 4 times in a row
    out = trainer._generate_and_score_completions(rows)
    adv = out["advantages"].view(2, 2, 4)  # [step, episode, sample]
    assert torch.allclose(adv.sum(-1), torch.zeros(2, 2), atol=1e-4)  # TRL's group baseline, per episode
    # the 4 samples of an episode start from the same memory: a fresh one, then (never reset) the memory the
    # group's first sample left, although the samples' answers, and so their final memories, differ
    batch = trainer.episode_collator(rows)
    steps = trainer.collect_rollout(batch)
    first = steps[0]["prev_memory"].view(2, 4, *steps[0]["prev_memory"].shape[1:])
    left = trainer._carried["actor"].clone()
    assert torch.equal(first[:, 0], first[:, 3]) and not torch.equal(first[0, 0], first[1, 0])
    assert not torch.equal(left[0], left[1])
    again = trainer.collect_rollout(batch)
    assert again[0]["memory_resets"] == 0.0
    assert torch.equal(again[0]["prev_memory"], left[::4].repeat_interleave(4, 0))


def test_long_range_topic_change_rewards_not_repeating_the_saved_data():
    reward = TopicChangeReward(TensorBLEUReward("saved_ids", max_n=2, smoothing="method4"))
    comp = [[11, 12, 13, 3], [20, 21, 22, 3]]
    saved = [[11, 12, 13, 3], [11, 12, 13, 3]]
    plain = reward([""] * 2, [""] * 2, comp, saved_ids=saved, topic_change=[False, False])
    change = reward([""] * 2, [""] * 2, comp, saved_ids=saved, topic_change=[True, False])
    assert plain[0] > 0 and plain[0] > plain[1]
    assert change == pytest.approx([1 - plain[0], plain[1]])
    assert reward.__name__ == "tensorbleu"


def test_impo_curriculum_driver_runs_its_stages_in_order(tmp_path, tok):
    from transformers_rxt.training.impo import IMPOStage, exponential_schedule, run_impo_curriculum

    assert [s.steps for s in exponential_schedule(10, longest=8)] == [1, 2, 4, 8]
    m = model()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    stages = [IMPOStage(steps=1, max_steps=1, unfreeze_schedule="0:fetch"),
              IMPOStage(steps=2, max_steps=1, strategy="long_range", random_resets_ratio=0.0)]
    results = run_impo_curriculum(m, stages, impo_args(tmp_path), train_dataset=episodes(8), processing_class=tok,
                                  output_dir=str(tmp_path / "curriculum"))
    assert [(r["stage"], r["steps"]) for r in results] == [(0, 1), (1, 2)]
    assert "reward_step1" in results[0] and "reward_step2" in results[1] and "reward_step2" not in results[0]
    assert (tmp_path / "curriculum" / "stage1_steps2" / "config.json").is_file()
    assert any(not torch.equal(before[n], p) for n, p in m.named_parameters())


# ------------------------------------------------------------------------------------------ DMPO
def dmpo_dataset(n=4, turns=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        acc = [_turn(g) for _ in range(turns)]
        rej = [t[: t.index(6) + 1] + torch.randint(11, 96, (3,), generator=g).tolist() + [3] for t in acc]
        rows.append({"turn_input_ids": acc, "rejected_turn_input_ids": rej})
    return datasets.Dataset.from_list(rows)


def dmpo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                learning_rate=3e-3, logging_steps=1, seed=0, report_to="none", save_strategy="no")
    base.update(kw)
    return DMPOConfig(**base)


def test_dmpo_loss_decreases_on_fixed_batch(tmp_path, tok):
    trainer = DMPOTrainer(model(), args=dmpo_args(tmp_path, max_steps=6, beta=0.5), train_dataset=dmpo_dataset(4),
                          processing_class=tok)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.01
    assert all(math.isfinite(x) for x in losses)
    assert trainer.state.log_history[-2]["rewards/accuracies"] == 1.0


def _dmpo_rows(trainer, batch, init):
    """Per-row summed answer log-probs (accepted rows, then rejected) of the policy and of the reference."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kw = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        policy = trainer.model(**kw, init_memory=init, labels=labels).log_probs.sum(1)
        ref = trainer.ref_model(**kw, init_memory=init, labels=labels).log_probs.sum(1)
    return policy, ref


def test_dmpo_accepted_answer_not_in_memory_while_scoring(tmp_path, tok):
    ds = dmpo_dataset(2)
    trainer = DMPOTrainer(model(), ref_model=model(seed=1), args=dmpo_args(tmp_path), train_dataset=ds,
                          processing_class=tok)
    collate = trainer.data_collator
    batch = collate([ds[0], ds[1]])
    # rows: (episode, turn) pairs, 2 episodes x 3 turns, accepted rows then rejected rows
    assert batch["row_episode"].tolist() == [0, 0, 0, 1, 1, 1] and batch["input_ids"].shape[0] == 12
    init = trainer.accelerator.unwrap_model(trainer.model).init_memory(2, generator=torch.Generator().manual_seed(0))
    # change the accepted answer of turn 1 of episode 0 only: the scores of turn 1 must not change for the
    # rejected answer (no leak), for the policy and for the reference (its own memory), while turn 2 may
    changed = dict(ds[0])
    turns = [list(t) for t in changed["turn_input_ids"]]
    a = turns[1].index(6) + 1
    turns[1][a:-1] = [11] * (len(turns[1]) - a - 1)  # a new accepted answer (one token moves a random
    changed["turn_input_ids"] = turns  # tiny model's turn-2 scores by less than float resolution)
    other = collate([changed, ds[1]])
    for s_a, s_b in zip(_dmpo_rows(trainer, batch, init.memory), _dmpo_rows(trainer, other, init.memory)):
        rejected_a, rejected_b = s_a[6:], s_b[6:]
        assert torch.equal(rejected_a[:2], rejected_b[:2])  # episode 0, turns 0 and 1
        assert not torch.equal(rejected_a[2], rejected_b[2])  # turn 2 reads turn 1's accepted answer
        assert torch.equal(rejected_a[3:], rejected_b[3:])  # episode 1 untouched


def test_dmpo_uses_trls_loss_types_and_beta_on_memory_conditioned_logps(tmp_path, tok):
    """loss_type ["sigmoid", "sft"] (TRL's RPO), beta as in TRL (summed log-probs): the trainer's loss equals
    -logsigmoid(beta * ((pi_acc - pi_rej) - (ref_acc - ref_rej))) + w * accepted-token NLL, with the
    log-probs read from each turn's memory by the policy and by the reference (its own memory)."""
    import torch.nn.functional as F

    ds = dmpo_dataset(2)
    args = dmpo_args(tmp_path, beta=0.3, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    trainer = DMPOTrainer(model(), ref_model=model(seed=1), args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([ds[0], ds[1]])
    trainer.model.eval()
    generator_state = trainer._rng
    loss = trainer.compute_loss(trainer.model, batch)
    trainer._rng = generator_state  # the same initial memory again
    init = trainer.accelerator.unwrap_model(trainer.model).init_memory(
        2, generator=trainer._step_generator(trainer.accelerator.device)).memory
    policy, ref = _dmpo_rows(trainer, batch, init)
    z = 0.3 * ((policy[:6] - policy[6:]) - (ref[:6] - ref[6:]))
    labels = batch["completion_mask"][:6, 1:].bool()
    with torch.no_grad():
        out = trainer.model(**{k: v for k, v in batch.items() if k != "completion_mask"}, init_memory=init,
                            labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100))
    nll = -out.log_probs[:6][labels].mean()
    assert loss.item() == pytest.approx((-F.logsigmoid(z).mean() + 0.5 * nll).item(), abs=1e-5)
    assert float(z.abs().max()) > 0  # the reference differs: the margin is not trivially zero


def test_impo_loss_stays_finite_where_the_padding_token_is_never_emitted(tmp_path, tok):
    """A trained model gives its padding token a log-prob of -100 or less. TRL's loss takes exp(ref - policy) and
    exp(policy - old) at every completion position before it masks, so the log-probs of untrained positions
    (after an [EOS], rows padded to a longer step) must agree between the rollout and the training forward: both
    are 0 there. Before, the rollout's were 0 where rows were padded and the forward's were log p(pad), so one
    position held exp(300) = inf, and inf x 0 = NaN reached every gradient (a main-job IMPO run failed so)."""
    m = model()
    pad, eos = m.config.pad_token_id, m.config.eos_token_id

    def never_pad_often_eos(module, args, logits):  # as a trained model: pad far below, [EOS] common
        logits = logits.clone()
        logits[..., pad] -= 300.0
        logits[..., eos] += 4.0
        return logits

    m.lm_head.register_forward_hook(never_pad_often_eos)
    args = impo_args(tmp_path, beta=0.05, num_generations=2, advantage_estimator="group", num_iterations=2)
    trainer = impo(tmp_path, tok, args, model=m)
    inputs = trainer._generate_and_score_completions([episodes(4)[i] for i in range(4)])
    trained = inputs["completion_mask"] * inputs["tool_mask"]
    assert bool((trained == 0).any()) and bool((trained == 1).any())  # untrained positions are in the batch
    for key in ("ref_per_token_logps", "old_per_token_logps"):
        assert bool((inputs[key][trained == 0] == 0).all()) and bool((inputs[key][trained == 1] < 0).all()), key
    trainer.model.eval()  # no gradient-accumulation scaling (the loss is the same)
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert math.isfinite(loss.item())
    assert all(bool(torch.isfinite(p.grad).all()) for p in m.parameters() if p.grad is not None)
