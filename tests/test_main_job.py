"""The main job's pieces (issue 9): `rxt train` on the micro preset end to end (every stage, the retention
check, the Hub-ready directory), resuming, `rxt chat --script`, `rxt eval-memory`, `rxt bench`, and the
errors of the curriculum runner."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from transformers_rxt.cli import build_parser, main
from transformers_rxt.curriculum import (
    STAGES,
    CurriculumError,
    is_complete_checkpoint,
    latest_checkpoint,
    parse_stages,
    run_curriculum,
)
from transformers_rxt.data import fact_recall_reward

from conftest import micro_log


def test_micro_curriculum_runs_every_stage(micro_run):
    for stage in STAGES:
        report = json.loads((micro_run / f"stage{stage.number}" / "stage_report.json").read_text())
        assert report["stage"].startswith(f"stage{stage.number}")
    assert json.loads((micro_run / "stage5" / "stage5_eval.json").read_text()).keys() == {"before", "after"}
    retention = json.loads((micro_run / "memory_retention.json").read_text())
    assert retention["model"] == str((micro_run / "stage5").resolve())
    assert retention["memory"]["n"] == retention["reset"]["n"] > 0
    assert set(retention["memory"]["per_distance"]) <= {str(d) for d in range(1, 9)}
    log = micro_log[str(micro_run)]
    for stage in STAGES:
        assert f"[rxt train] stage {stage.number} (" in log
    # stage 4 vs stage 5 on identical dialogues: one table, headed by what it measured, with the change's noise band
    assert "the same questions before and after stage5" in log
    assert "[16 heldout dialogues, fact-question distances 1-8, corpus seed 2;" in log
    assert "change in recall, stage4 -> stage5:" in log and "95% noise band" in log
    assert log.count("distance |") == 3  # stage 4's check, stage 5's before/after check, the final comparison
    assert "Hub-ready model directory" in log


def test_hub_ready_directory_loads_and_carries_the_card(micro_run):
    hub = micro_run / "hub"
    card = (hub / "README.md").read_text()
    assert "raml-v1.0" in card and "gated" in card.lower()
    stages = [r["stage"] for r in json.loads((hub / "rxt_training_stages.json").read_text())]
    assert stages == ["joint-pretraining", "joint-sft", "memory-attention-pretraining", "supervised-memory-aware",
                      "mrl"]
    model = AutoModelForCausalLM.from_pretrained(str(hub), trust_remote_code=True)
    final = AutoModelForCausalLM.from_pretrained(str(micro_run / "stage5"), trust_remote_code=True)
    for (name, a), b in zip(model.state_dict().items(), final.state_dict().values()):
        assert torch.equal(a, b), name


def test_rerun_skips_completed_stages(micro_run, capsys):
    assert main(["train", "--preset", "micro", "--output", str(micro_run), "--eval-dialogues", "16",
                 "--no-hub"]) == 0
    log = capsys.readouterr().out
    assert log.count("already complete") == len(STAGES)
    assert "memory retention of" not in log  # the saved result of the same model and dialogues is reused


def test_interrupted_stage_resumes_from_its_last_complete_checkpoint(micro_run, tmp_path, capsys):
    """A run killed while writing checkpoint-12 leaves a folder without weights: the rerun used to pick it and
    fail on every try. It resumes from checkpoint-6 now, and the report counts the tokens of all 12 steps (it
    used to count only those after the checkpoint)."""
    out = tmp_path / "run"
    shutil.copytree(micro_run, out, ignore=shutil.ignore_patterns("stage4", "stage5", "hub"))
    run_curriculum("micro", out, "4", extra_args=["--max_steps", "6"])  # the run "stopped" after checkpoint-6
    (out / "stage4" / "stage_report.json").unlink()
    broken = out / "stage4" / "checkpoint-12"
    broken.mkdir()
    shutil.copy(out / "stage4" / "checkpoint-6" / "config.json", broken)  # killed before the weights were written
    assert latest_checkpoint(out / "stage4").name == "checkpoint-6"
    capsys.readouterr()
    reports = run_curriculum("micro", out, "4")
    log = capsys.readouterr().out
    assert "checkpoint-12 is incomplete" in log and "resuming from checkpoint-6" in log
    full = json.loads((micro_run / "stage4" / "stage_report.json").read_text())
    assert reports[0]["steps"] == 12 and not reports[0]["skipped"]
    assert reports[0]["train_tokens"] == full["train_tokens"] > 0


def test_only_checkpoints_the_trainer_finished_count_as_complete(tmp_path):
    def checkpoint(step: int, files: dict) -> None:
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)

    checkpoint(5, {"model.safetensors": "w", "trainer_state.json": '{"global_step": 5}'})
    checkpoint(10, {"model.safetensors": "w", "trainer_state.json": '{"global_st'})  # cut off while writing
    checkpoint(15, {"trainer_state.json": '{"global_step": 15}'})  # no weights
    checkpoint(20, {"model.safetensors": "w"})  # no state: the save stopped before its last file
    assert [is_complete_checkpoint(tmp_path / f"checkpoint-{n}") for n in (5, 10, 15, 20)] == [True, False, False,
                                                                                                False]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert latest_checkpoint(tmp_path / "nothing-here") is None


def test_chat_script_streams_and_updates_memory(micro_run, tmp_path, capsys):
    script = tmp_path / "chat.txt"
    script.write_text("Mia has a pink kite.\n\nWhat colour is Mia's kite?\n")
    memory_file = tmp_path / "stm.safetensors"
    assert main(["chat", str(micro_run / "hub"), "--script", str(script), "--greedy", "--max-new-tokens", "6",
                 "--save-memory", str(memory_file)]) == 0
    log = capsys.readouterr().out
    assert "> Mia has a pink kite." in log and "> What colour is Mia's kite?" in log
    assert log.count("[memory updated") == 2
    assert memory_file.is_file()


def test_eval_memory_command_writes_json(micro_run, tmp_path, capsys):
    target = tmp_path / "ret.json"
    assert main(["eval-memory", str(micro_run / "stage5"), "--dialogues", "6", "--max-distance", "2",
                 "--output", str(target)]) == 0
    result = json.loads(target.read_text())
    assert result["dialogues"] == {"count": 6, "max_distance": 2, "seed": 2, "split": "heldout"}
    assert "memory" in capsys.readouterr().out


def test_bench_command_runs_a_benchmark(capsys):
    assert main(["bench", "tensorbleu", "--batches", "4", "--lengths", "16", "--repeats", "1",
                 "--no-sacrebleu"]) == 0
    assert "TensorBLEU" in capsys.readouterr().out


@pytest.mark.parametrize("spec, expected", [("0-5", [0, 1, 2, 3, 4, 5]), ("4,5", [4, 5]), ("1-2,4", [1, 2, 4]),
                                            (None, [0, 1, 2, 3, 4, 5]), ([5, 3], [3, 5])])
def test_parse_stages(spec, expected):
    assert parse_stages(spec) == expected


@pytest.mark.parametrize("spec", ["6", "3-1", "one", ""])
def test_parse_stages_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match="stages"):
        parse_stages(spec)


def test_curriculum_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown preset 'huge'.*tiny"):
        run_curriculum("huge", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"run the earlier stages first \(--stages 0-4\)"):
        run_curriculum("micro", tmp_path, "4")
    with pytest.raises(FileNotFoundError, match="stage-0 tokenizer"):
        run_curriculum("micro", tmp_path, "1")
    partial = tmp_path / "partial-preset"
    partial.mkdir()
    (partial / "stage0.yaml").write_text("vocab_size: 300\n")
    with pytest.raises(ValueError, match=r"no configuration for stage\(s\) \[5\]"):
        run_curriculum(str(partial), tmp_path / "out", "0,5")
    assert main(["train", "--preset", "huge", "--output", str(tmp_path)]) == 2
    assert "rxt train: error: unknown preset" in capsys.readouterr().err


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"train", "chat", "eval-memory", "convert-rxlm", "push", "bench"} <= set(commands)
    for name, sub in commands.items():
        assert sub.format_help().strip(), name


def test_fact_recall_reward():
    rewards = fact_recall_reward(
        prompts=["What colour is Anna's kite?", "What colour is Anna's kite?", "Hello!", "How many cups does Ben have?"],
        completions=["Anna's kite is red.", "Anna's kite is red or blue.", "Hi.", "Ben has 3 cups."],
        references=["Anna's kite is red.", "Anna's kite is red.", "Hello! How can I help you?", "Ben has 4 cups."])
    assert rewards == [1.0, 0.0, None, 0.0]


def test_impo_dmpo_example_runs(micro_run, tmp_path, capsys, monkeypatch):
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "impo_dmpo.py"
    monkeypatch.setattr("sys.argv", [str(script), str(micro_run / "stage4"), "--steps", "1",
                                     "--output", str(tmp_path)])
    runpy.run_path(str(script), run_name="__main__")
    log = capsys.readouterr().out
    assert "IMPO: held-out recall" in log and "DMPO: held-out recall" in log


def test_training_is_reproducible(tmp_path):
    """The same command twice gives the same weights: models are built after seeding from the arguments' seed
    (the stage-1 model used to be initialised from torch's unseeded generator)."""
    from safetensors.torch import load_file

    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            run_curriculum("micro", tmp_path / run, "0-1")
            torch.manual_seed(1234 if run == "a" else 4321)  # whatever ran before must not matter
    finally:
        torch.set_num_threads(threads)
    a, b = (load_file(tmp_path / run / "stage1" / "model.safetensors") for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_launcher_runs_training_stages_as_subprocesses(tmp_path, capsys):
    """`--launcher` (e.g. "accelerate launch ...") runs stages 1-5 as commands; a plain python stands in here."""
    import sys

    reports = run_curriculum("micro", tmp_path, "0-1", launcher=sys.executable,
                             extra_args=["--max_steps", "2", "--disable_tqdm", "true"])
    assert [r["stage"] for r in reports] == ["stage0", "stage1"]
    assert reports[1]["steps"] == 2  # the extra arguments reached the subprocess
    with pytest.raises(CurriculumError, match=r"-m transformers_rxt\.training\.stages\.stage1_joint_pretrain --config "
                                              ".* failed with exit status"):
        run_curriculum("micro", tmp_path / "bad", "0-1", launcher=sys.executable, extra_args=["--no_such_option"])


def test_train_dry_run_prints_each_stage_and_runs_nothing(tmp_path, capsys):
    from transformers_rxt.curriculum import preset_dir

    assert main(["train", "--preset", "micro", "--output", str(tmp_path), "--dry-run", "--", "--max_steps", "2"]) == 0
    log = capsys.readouterr().out
    micro = preset_dir("micro")
    assert f"-m transformers_rxt.training.stages.stage0_tokenizer --config {micro / 'stage0.yaml'} " \
           f"--output_dir {tmp_path / 'stage0'}\n" in log  # the tokenizer takes no training options
    assert f"-m transformers_rxt.training.stages.stage1_joint_pretrain --config {micro / 'stage1.yaml'} --output_dir " \
           f"{tmp_path / 'stage1'} --tokenizer {tmp_path / 'stage0'} --model_config {micro / 'model.yaml'} " \
           "--max_steps 2\n" in log
    assert log.count(" -m transformers_rxt.training.stages.") == len(STAGES)
    assert list(tmp_path.iterdir()) == []


def test_dry_run_of_a_finished_run_skips_every_stage(micro_run, capsys):
    assert main(["train", "--preset", "micro", "--output", str(micro_run), "--dry-run", "--algorithm", "dmpo"]) == 0
    log = capsys.readouterr().out
    assert log.count("would be skipped") == len(STAGES)
    assert "stage 5 (memory reinforcement learning (IMPO), DMPO): already complete" in log


def test_the_package_runs_no_scripts():
    """The stages and benchmarks are called as functions (issue 18): nothing in the package executes files."""
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "transformers_rxt"
    offenders = [p.name for p in package.rglob("*.py") if "runpy" in p.read_text() or "run_path" in p.read_text()]
    assert offenders == []


def test_cpu_processes_split_each_stage_batch_and_keep_stage_5_whole(tmp_path, capsys):
    """`--cpu-processes N`: stages 1-4 run as N gloo DDP processes, each with 1/N of the stage's batch (so the
    global batch is the preset's); stage 5's rollout batch is not split; a batch N does not divide is refused."""
    from transformers_rxt.curriculum import plan_curriculum, preset_dir

    plan = plan_curriculum("micro", tmp_path, cpu_processes=2, extra_args=["--max_steps", "2"])
    assert [run.processes for run in plan] == [1, 2, 2, 2, 2, 1]
    # micro's batches: 16, 16, 8, 8 -> 8, 8, 4, 4 per process, after the extra arguments (the last value wins)
    assert [run.argv[-4:] for run in plan[1:5]] == [("--use_cpu", "true", "--per_device_train_batch_size", b)
                                                     for b in ("8", "8", "4", "4")]
    command = plan[4].command(threads=1)
    assert command[1:3] == ["-m", "accelerate.commands.launch"]
    assert command[command.index("--config_file") + 1] == str(preset_dir("micro").parent / "accelerate" / "ddp.yaml")
    assert command[command.index("--num_processes") + 1] == "2"
    assert command[command.index("--num_cpu_threads_per_process") + 1] == "1"
    assert plan[5].command()[1:3] == ["-m", "transformers_rxt.training.stages.stage5_impo"]
    # an explicit batch in the extra arguments is the one split
    overridden = plan_curriculum("micro", tmp_path, "0-1", cpu_processes=2,
                                 extra_args=["--per_device_train_batch_size=6"])
    assert overridden[1].argv[-1] == "3"
    with pytest.raises(ValueError, match=r"cpu_processes=3 must divide stage 1's batch \(per_device_train_batch_size "
                                         r"16 in stage1\.yaml"):
        plan_curriculum("micro", tmp_path, cpu_processes=3)
    with pytest.raises(ValueError, match="cpu_processes must be >= 1, got 0"):
        plan_curriculum("micro", tmp_path, cpu_processes=0)
    with pytest.raises(ValueError, match="give one of them"):
        run_curriculum("micro", tmp_path, launcher="accelerate launch", cpu_processes=2)
    for dry_run in ([], ["--dry-run"]):
        assert main(["train", "--preset", "micro", "--output", str(tmp_path), "--launcher", "x", "--cpu-processes",
                     "2", *dry_run]) == 2
        assert "(--launcher, --cpu-processes) both say how to run the stages" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # refused before any work
    assert main(["train", "--preset", "micro", "--output", str(tmp_path), "--dry-run", "--cpu-processes", "2"]) == 0
    assert capsys.readouterr().out.count("-m accelerate.commands.launch") == 4


def test_cpu_processes_train_the_same_global_batch(tmp_path):
    """Stage 1 on 2 CPU processes (real gloo DDP) trains the rows one process trains at the preset's batch."""
    common = ["--max_steps", "2", "--disable_tqdm", "true"]
    one = run_curriculum("micro", tmp_path / "one", "0-1", extra_args=common, log=lambda _: None)[1]
    two = run_curriculum("micro", tmp_path / "two", "0-1", extra_args=common, cpu_processes=2,
                         log=lambda _: None)[1]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["steps"] == one["steps"] == 2
    assert two["train_tokens"] == one["train_tokens"]  # summed over both processes: the same rows
