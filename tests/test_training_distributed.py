"""Stages 1, 4 and 5 under a real 2-process `accelerate launch` on CPU (gloo DDP, with the shipped
trainers/configs/accelerate/ddp.yaml), as the stage scripts run; stage 4 resumed from a checkpoint; one DDP step of
stage 4 against one process on the concatenated batch; stages 1 and 4 sharded with FSDP2 (the shipped fsdp2.yaml)
and resumed from a sharded checkpoint."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from transformers_rxt import RxTForConversationalGeneration, train_rxt_tokenizer
from transformers_rxt.data import memory_dialogues, pretraining_texts, sft_pairs
from transformers_rxt.training import RxTForJointLMTraining

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = Path(sys.executable).with_name("accelerate")

TINY_MODEL = {
    "decoder_config": dict(num_layers=2, embed_dim=32, att_heads=4, att_groups=2, att_query_groups=2,
                           cross_att_groups=2, cross_att_query_groups=2, ff_dim=48, seq_len=64, stm_size=8),
    "encoder_config": dict(num_layers=2, embed_dim=32, att_heads=4, att_groups=2, att_query_groups=2, ff_dim=48,
                           seq_len=64, stm_size=8, skip_memory_cross_attention=True),
    # a FIFO memory, as the tiny preset's (its stage 4 trains the FIFO write's token loss)
    "memory_attention_config": dict(num_layers=2, embed_dim=32, att_heads=4, att_groups=2, att_query_groups=2,
                                    interlayer_att_groups=2, interlayer_att_query_groups=2, seq_len=64, stm_size=8,
                                    use_gated_residual=True, residual_gate_type="elementwise",
                                    residual_per_slot_gate=True, residual_gate_slot_status_type="linear",
                                    use_tanh_residual_gate=False, fifo_write_slots=2),
    "stm_init_type": "learned",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, tmp_path: Path, *args: str, config: str = "ddp.yaml") -> None:
    """``accelerate launch`` ``script`` (relative to the repository) on 2 CPU processes with the shipped ``config``."""
    env = dict(os.environ)
    env.update(
        ACCELERATE_CONFIG_FILE=str(tmp_path / "no-accelerate-config.yaml"),  # never a stray user config
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
    )
    cmd = [str(ACCELERATE), "launch", "--config_file", str(REPO / "trainers/configs/accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(free_port()), str(REPO / script), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not installed next to this python")
def test_stages_1_4_and_5_complete_on_two_processes_and_resume(tmp_path):
    tok = train_rxt_tokenizer(pretraining_texts(200) + [f"{p['query']} {p['answer']}" for p in sft_pairs(200)],
                              vocab_size=300)
    tok.save_pretrained(tmp_path / "stage0")
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(TINY_MODEL))
    common = ["--max_steps", "2", "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true"]

    stage1 = ["--config", "trainers/configs/tiny/stage1.yaml", "--tokenizer", str(tmp_path / "stage0"),
              "--model_config", str(tmp_path / "model.yaml"), "--num_samples", "32",
              "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "1",
              "--save_total_limit", "2", *common]
    launch("trainers/stage1_joint_pretrain.py", tmp_path, "--output_dir", str(tmp_path / "stage1"), *stage1)
    report = json.loads((tmp_path / "stage1" / "stage_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2
    assert report["train_tokens"] > 0  # summed over both processes
    # stage 1 resumed from checkpoint-1 (MLM masking and memory noise drawn again from the step's seed)
    launch("trainers/stage1_joint_pretrain.py", tmp_path, "--output_dir", str(tmp_path / "stage1_resumed"),
           "--resume_from_checkpoint", str(tmp_path / "stage1" / "checkpoint-1"), *stage1)
    full = RxTForJointLMTraining.from_pretrained(tmp_path / "stage1").state_dict()
    resumed = RxTForJointLMTraining.from_pretrained(tmp_path / "stage1_resumed").state_dict()
    assert any(k.startswith("mlm_head.") for k in full)
    for name, value in full.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)

    stage4 = ["--config", "trainers/configs/tiny/stage4.yaml", "--init_from", str(tmp_path / "stage1"),
              "--curriculum_turns", "2", "3", "--curriculum_samples", "8", "8", "--per_device_train_batch_size", "2",
              "--retention_dialogues", "0", "--unfreeze_encoder_step", "1", "--save_strategy", "steps",
              "--save_steps", "1", "--save_total_limit", "2", *common]
    launch("trainers/stage4_memory_aware.py", tmp_path, "--output_dir", str(tmp_path / "stage4"), *stage4)
    report = json.loads((tmp_path / "stage4" / "stage_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2
    assert "loss_turn_1" in report["last_log"]
    full = RxTForConversationalGeneration.from_pretrained(tmp_path / "stage4")  # a loadable HF model directory
    # Trainer's own resume (no private override): from checkpoint-1 to the same weights as the whole run
    launch("trainers/stage4_memory_aware.py", tmp_path, "--output_dir", str(tmp_path / "stage4_resumed"),
           "--resume_from_checkpoint", str(tmp_path / "stage4" / "checkpoint-1"), *stage4)
    resumed = RxTForConversationalGeneration.from_pretrained(tmp_path / "stage4_resumed").state_dict()
    for name, value in full.state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)

    # stage 5 from the mini (realistic) presets, with the Hub dataset replaced by a local file in the same format
    # (records without recall probes, as on the Hub): IMPO, then DMPO, each two updates on two processes.
    episodes = tmp_path / "mrl.jsonl"
    with episodes.open("w") as fh:
        for record in memory_dialogues(16, max_distance=2, num_turns=3):
            fh.write(json.dumps({k: record[k] for k in ("query", "answer", "interactions")}) + "\n")
    stage5 = ["--init_from", str(tmp_path / "stage4"), "--dataset", str(episodes), "--max_length", "64",
              "--per_device_train_batch_size", "2", "--bf16", "false", "--report_to", "none",
              "--save_strategy", "no", *common]
    launch("trainers/stage5_impo.py", tmp_path, "--config", "trainers/configs/mini/stage5.yaml", "--output_dir",
           str(tmp_path / "stage5"), "--num_generations", "2", "--max_completion_length", "8",
           *stage5)
    report = json.loads((tmp_path / "stage5" / "stage_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2 and report["stage"] == "stage5_impo"
    launch("trainers/stage5_impo.py", tmp_path, "--config", "trainers/configs/mini/stage5_dmpo.yaml", "--algorithm", "dmpo",
           "--output_dir", str(tmp_path / "stage5_dmpo"), *stage5)
    report = json.loads((tmp_path / "stage5_dmpo" / "stage_report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 2 and "rewards/margins" in report["last_log"]


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not installed next to this python")
def test_ddp_stage4_step_equals_one_process_on_the_concatenated_batch(tmp_path):
    """One SGD step of stage 4 on 4 episodes: 2 processes with 2 episodes each (different turn counts and
    answer lengths per process, review questions, the write token loss on a FIFO memory) give the parameters
    of 1 process on all 4. Each part of the stage loss is a mean per turn boundary over the step's whole batch
    (counts summed over processes), not each process's own mean."""
    worker = "tests/ddp_stage4_step.py"
    launch(worker, tmp_path, str(tmp_path / "two.pt"))
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, str(REPO / worker), str(tmp_path / "one.pt")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert one["initial"].keys() == one["params"].keys() == two["params"].keys()
    update = max(float((one["params"][n] - p).abs().max()) for n, p in one["initial"].items())
    assert update > 1e-2  # a real step (learning rate 1, plain SGD): 1e-5 is a tight bound on it
    for name, value in one["params"].items():
        torch.testing.assert_close(two["params"][name], value, rtol=0, atol=1e-5, msg=name)
    assert two["loss"] == pytest.approx(one["loss"], abs=1e-5)  # the logged loss is the whole batch's too


def torchrun(worker: str, processes: int, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
           str(free_port()), str(REPO / worker), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{worker} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


def test_fsdp2_stages_1_and_4_resume_to_the_same_weights(tmp_path):
    """Stages 1 and 4 sharded by accelerate's FSDP2 code with the shipped fsdp2.yaml, 2 CPU processes (gloo):
    two steps, or one step, a sharded checkpoint (model + optimizer), a model built from another seed that loads
    it, and the second step: the same weights (full-state-dict HF outputs). Stage 4 on 2 processes also equals 1
    process on the concatenated batch (1e-5). Trainer itself cannot run FSDP on CPU (see the README)."""
    from fsdp_stage_steps import build

    worker = "tests/fsdp_stage_steps.py"
    torchrun(worker, 2, str(tmp_path), "full")
    torchrun(worker, 2, str(tmp_path), "resume")
    torchrun(worker, 1, str(tmp_path), "full")
    for stage in (1, 4):
        full = RxTForConversationalGeneration.from_pretrained(tmp_path / f"stage{stage}-full-world2").state_dict()
        resumed = RxTForConversationalGeneration.from_pretrained(tmp_path / f"stage{stage}-resume-world2")
        single = RxTForConversationalGeneration.from_pretrained(tmp_path / f"stage{stage}-full-world1").state_dict()
        initial = build(stage, seed=0).state_dict()
        assert max(float((value - initial[name]).abs().max()) for name, value in full.items()) > 1e-2  # trained
        for name, value in resumed.state_dict().items():
            torch.testing.assert_close(value, full[name], rtol=0, atol=1e-6, msg=f"stage {stage}: {name}")
            if stage == 4:
                torch.testing.assert_close(single[name], full[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate CLI not installed next to this python")
def test_trl_stage5_trainers_on_two_processes_resume_to_the_same_weights(tmp_path):
    """IMPO (trl.GRPOTrainer) and DMPO (trl.DPOTrainer) under a 2-process `accelerate launch` (gloo DDP, the
    shipped ddp.yaml): two steps, then the same run resumed from checkpoint-1 by Trainer's own resume: the same
    weights (the rollouts and the episodes' initial memories are drawn from (seed, step, process))."""
    from rxt_factories import tiny_model
    from test_impo import VOCAB

    worker = "tests/trl_stage5_steps.py"
    launch(worker, tmp_path, str(tmp_path), "full")
    launch(worker, tmp_path, str(tmp_path), "resume")
    initial = tiny_model(vocab=VOCAB).state_dict()
    for name in ("impo", "dmpo"):
        full = RxTForConversationalGeneration.from_pretrained(tmp_path / f"{name}-full" / "final").state_dict()
        resumed = RxTForConversationalGeneration.from_pretrained(tmp_path / f"{name}-resume" / "final").state_dict()
        assert max(float((value - initial[key]).abs().max()) for key, value in full.items()) > 1e-4, name  # trained
        # the resumed run really started at step 1 (it trained and saved step 2 only)
        assert not (tmp_path / f"{name}-resume" / "checkpoint-1").exists()
        assert (tmp_path / f"{name}-resume" / "checkpoint-2").is_dir()
        for key, value in full.items():
            torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=f"{name}: {key}")
        state = json.loads((tmp_path / f"{name}-full" / "checkpoint-2" / "trainer_state.json").read_text())
        assert ("rewards/margins" if name == "dmpo" else "reward_step2") in state["log_history"][0]
