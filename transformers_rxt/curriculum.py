"""Run a preset's whole training curriculum, stage by stage, resumably (what ``rxt train`` does).

Every stage is a module of :mod:`transformers_rxt.training.stages` (``main(argv)``) with its preset YAML, which
ships as package data (``transformers_rxt/presets/<preset>/``; the checkout's ``trainers/configs`` is a link to
that folder). The runner points each stage at the previous stage's output under one directory::

    OUT/stage0  tokenizer                OUT/stage3  memory-attention pre-training
    OUT/stage1  joint LM pre-training    OUT/stage4  supervised memory-aware training
    OUT/stage2  joint SFT                OUT/stage5  IMPO (or DMPO)

A stage whose directory already holds ``stage_report.json`` (written after its model is saved) is complete
and skipped; a stage that stopped part-way restarts from its newest complete ``checkpoint-*`` directory
(presets that save checkpoints; one the run was killed while writing is passed over). So running the same
command again continues an interrupted run where it stopped.

Stages run in this process by default (their ``main`` is called directly); ``launcher="accelerate launch ..."``
runs each training stage as ``<launcher> -m transformers_rxt.training.stages.<stage> ...`` instead (several GPUs
or processes). ``cpu_processes=N`` runs stages 1-4 as N data-parallel CPU processes (gloo DDP) with the preset's
global batch: each process gets 1/N of the stage's ``per_device_train_batch_size``, so the recipe is the same
and a machine's N cores share the training.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CPU_PARALLEL_STAGES", "CurriculumError", "STAGES", "Stage", "StageRun", "check_launch_options",
           "cpu_data_parallel_launcher", "parse_stages", "is_complete_checkpoint", "latest_checkpoint", "plan_curriculum", "preset_dir", "presets",
           "presets_root", "run_curriculum", "stage_dir", "final_stage_dir"]


class CurriculumError(RuntimeError):
    """A stage failed or left no result (the message names the stage and the command)."""


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: its number, the stage name model cards use, its module and preset file."""

    number: int
    name: str
    title: str
    module: str
    config: str

    @property
    def entry_point(self) -> str:
        """The importable module whose ``main(argv)`` runs the stage."""
        return f"transformers_rxt.training.stages.{self.module}"

    @property
    def script(self) -> str:
        """The thin launcher in the repository's ``trainers/`` folder (``accelerate launch trainers/<script>``)."""
        return f"{self.module}.py"


STAGES: tuple[Stage, ...] = (
    Stage(0, "tokenizer", "tokenizer", "stage0_tokenizer", "stage0.yaml"),
    Stage(1, "joint-pretraining", "joint LM pre-training", "stage1_joint_pretrain", "stage1.yaml"),
    Stage(2, "joint-sft", "joint interaction SFT", "stage2_joint_sft", "stage2.yaml"),
    Stage(3, "memory-attention-pretraining", "memory-attention pre-training", "stage3_memory_attention",
          "stage3.yaml"),
    Stage(4, "supervised-memory-aware", "supervised memory-aware training", "stage4_memory_aware", "stage4.yaml"),
    Stage(5, "mrl", "memory reinforcement learning (IMPO)", "stage5_impo", "stage5.yaml"),
)
DMPO_CONFIG = "stage5_dmpo.yaml"
REPORT_FILE = "stage_report.json"
# The stages ``cpu_processes`` splits. Stage 5 stays whole: its batch is rollout groups (episodes x samples) whose
# rewards are scaled over the batch, which a split would change.
CPU_PARALLEL_STAGES = (1, 2, 3, 4)
BATCH_OPTION = "--per_device_train_batch_size"


def presets_root() -> Path:
    """The folder of the shipped presets (package data: ``transformers_rxt/presets``)."""
    root = files("transformers_rxt") / "presets"
    if not isinstance(root, Path) or not root.is_dir():  # a zip import: the stages need real files to parse
        raise FileNotFoundError(f"the presets of transformers_rxt are not a folder on disk ({root}); install the "
                                "package from its wheel or a source checkout, not as a zip")
    return root


def presets() -> list[str]:
    """The names of the shipped presets (folders with a ``model.yaml``; ``accelerate`` holds launcher configs)."""
    return sorted(p.name for p in presets_root().iterdir() if (p / "model.yaml").is_file())


def preset_dir(preset: str | os.PathLike) -> Path:
    """The folder of stage YAML files of ``preset``: a shipped preset's name (``tiny``, ``mini``, ``micro``) or
    a path to a folder of stage YAMLs."""
    if Path(preset).is_dir():
        return Path(preset).resolve()
    folder = presets_root() / str(preset)
    if not (folder / "model.yaml").is_file():
        raise ValueError(f"unknown preset {str(preset)!r}: expected one of {presets()} or a folder of stage YAML "
                         "files")
    return folder


def parse_stages(spec: str | Sequence[int] | None) -> list[int]:
    """``"0-5"``, ``"1,2,4"``, ``"all"``/None or a list of ints -> sorted stage numbers (validated)."""
    if spec is None or spec == "all":
        return [s.number for s in STAGES]
    if isinstance(spec, str):
        numbers: set[int] = set()
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d)(?:-(\d))?", part)
            if not match:
                raise ValueError(f"--stages {spec!r}: expected e.g. '0-5', '4,5' or 'all'")
            lo, hi = int(match[1]), int(match[2] or match[1])
            if lo > hi:
                raise ValueError(f"--stages {spec!r}: range {part!r} runs backwards")
            numbers.update(range(lo, hi + 1))
    else:
        numbers = {int(n) for n in spec}
    unknown = sorted(n for n in numbers if n not in range(len(STAGES)))
    if unknown or not numbers:
        raise ValueError(f"stages must be within 0-{len(STAGES) - 1}, got {spec!r}")
    return sorted(numbers)


def stage_dir(output_dir: str | os.PathLike, number: int) -> Path:
    return Path(output_dir) / f"stage{number}"


def is_complete(path: Path) -> bool:
    return (path / REPORT_FILE).is_file()


def final_stage_dir(output_dir: str | os.PathLike) -> Path:
    """The directory of the last complete model stage (1-5) under ``output_dir``."""
    for stage in reversed(STAGES[1:]):
        if is_complete(stage_dir(output_dir, stage.number)):
            return stage_dir(output_dir, stage.number)
    raise FileNotFoundError(f"{output_dir} holds no completed training stage (no stage*/{REPORT_FILE})")


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``Trainer`` finished writing the checkpoint folder ``path``: it writes ``trainer_state.json``
    after the weights, optimizer and RNG states, so a readable one next to the weights means nothing was cut
    off (a run killed while saving leaves the folder without them, or with a truncated state file)."""
    path = Path(path)
    try:
        json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return any((path / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json"))


def _checkpoints(path: str | os.PathLike) -> list[tuple[int, Path]]:
    return sorted((int(m[1]), p) for p in Path(path).glob("checkpoint-*")
                  if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))


def latest_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete ``checkpoint-N`` folder with the largest N under ``path`` (None if there is none);
    half-written ones (see :func:`is_complete_checkpoint`) are passed over."""
    complete = [p for _, p in _checkpoints(path) if is_complete_checkpoint(p)]
    return complete[-1] if complete else None


def _stage_arguments(stage: Stage, config: Path, out: Path, previous: Path | None) -> list[str]:
    args = ["--config", str(config), "--output_dir", str(out)]
    if stage.number == 1:
        args += ["--tokenizer", str(previous), "--model_config", str(config.parent / "model.yaml")]
    elif stage.number > 1:
        args += ["--init_from", str(previous)]
    return args


@dataclass(frozen=True)
class StageRun:
    """What :func:`run_curriculum` does for one stage: skip it (``complete``) or call ``stage.entry_point``'s
    ``main(argv)`` writing ``output``, resuming from ``checkpoint`` when there is one."""

    stage: Stage
    title: str
    output: Path
    argv: tuple[str, ...]
    complete: bool
    checkpoint: Path | None = None
    broken_checkpoints: tuple[Path, ...] = ()
    processes: int = 1  # > 1: data-parallel CPU processes (``argv`` then holds each process's share of the batch)

    def command(self, launcher: str | None = None, threads: int = 1) -> list[str]:
        """The equivalent command line: ``python -m ...``, under ``launcher``, or (``processes`` > 1) under
        :func:`cpu_data_parallel_launcher` with ``threads`` torch threads per process."""
        if self.processes > 1:
            launcher = cpu_data_parallel_launcher(self.processes, threads)
        return [*(shlex.split(launcher) if launcher else [sys.executable]), "-m", self.stage.entry_point,
                *self.argv]


def check_launch_options(launcher: str | None, cpu_processes: int) -> None:
    """Refuses two ways of running the stages at once (a ``launcher`` and ``cpu_processes`` > 1)."""
    if launcher and cpu_processes > 1:
        raise ValueError(f"launcher={launcher!r} and cpu_processes={cpu_processes} (--launcher, --cpu-processes) both "
                         "say how to run the stages: give one of them")


def cpu_data_parallel_launcher(processes: int, threads: int = 1) -> str:
    """``accelerate launch`` of ``processes`` gloo DDP processes on this machine's CPU, ``threads`` torch threads
    each, with the shipped ``presets/accelerate/ddp.yaml`` (the stage gets ``--use_cpu true``)."""
    with socket.socket() as s:  # a free port for the process group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return shlex.join([sys.executable, "-m", "accelerate.commands.launch",
                       "--config_file", str(presets_root() / "accelerate" / "ddp.yaml"),
                       "--num_processes", str(processes), "--num_cpu_threads_per_process", str(threads),
                       "--main_process_port", str(port)])


def _per_device_batch(config: Path, extra_args: Sequence[str]) -> int:
    """The ``per_device_train_batch_size`` a stage runs with: the last one in ``extra_args``, else its config's,
    else ``TrainingArguments``' default (8)."""
    value: Any = (yaml.safe_load(config.read_text()) or {}).get(BATCH_OPTION[2:], 8)
    for i, arg in enumerate(extra_args):
        if arg == BATCH_OPTION and i + 1 < len(extra_args):
            value = extra_args[i + 1]
        elif arg.startswith(BATCH_OPTION + "="):
            value = arg.split("=", 1)[1]
    return int(value)


def _split_batch_args(stage: Stage, config: Path, extra_args: Sequence[str], processes: int) -> list[str]:
    """The arguments that run ``stage`` as ``processes`` CPU processes with its global batch; refuses a batch
    that ``processes`` does not divide."""
    batch = _per_device_batch(config, extra_args)
    if batch % processes:
        raise ValueError(f"cpu_processes={processes} must divide stage {stage.number}'s batch "
                         f"(per_device_train_batch_size {batch} in {config.name} or the extra arguments) so that "
                         "the global batch stays the same: use a divisor of it, or cpu_processes=1")
    return ["--use_cpu", "true", BATCH_OPTION, str(batch // processes)]


def plan_curriculum(
    preset: str | os.PathLike,
    output_dir: str | os.PathLike,
    stages: str | Sequence[int] | None = None,
    *,
    algorithm: str = "impo",
    extra_args: Sequence[str] = (),
    cpu_processes: int = 1,
) -> list[StageRun]:
    """The stages :func:`run_curriculum` would run or skip, with their arguments; refuses (before any work) an
    unknown preset, a stage the preset has no config for, a stage whose input no earlier stage provides, and
    ``cpu_processes`` that does not divide the batch of a stage it would split."""
    if algorithm not in ("impo", "dmpo"):
        raise ValueError(f"algorithm must be 'impo' or 'dmpo', got {algorithm!r}")
    if cpu_processes < 1:
        raise ValueError(f"cpu_processes must be >= 1, got {cpu_processes}")
    config_dir = preset_dir(preset)

    def is_dmpo(stage: Stage) -> bool:
        return stage.number == 5 and algorithm == "dmpo"

    def config_of(stage: Stage) -> str:
        return DMPO_CONFIG if is_dmpo(stage) else stage.config

    available = [s.number for s in STAGES if (config_dir / config_of(s)).is_file()]
    wanted = available if stages is None else parse_stages(stages)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ValueError(f"preset {str(preset)!r} has no configuration for stage(s) {missing} "
                         f"(files in {config_dir}: {sorted(p.name for p in config_dir.glob('*.yaml'))})")
    output_dir = Path(output_dir).resolve()
    plan: list[StageRun] = []
    for number in wanted:
        stage = STAGES[number]
        out = stage_dir(output_dir, number)
        title = f"stage {number} ({stage.title}{', DMPO' if is_dmpo(stage) else ''})"
        if is_complete(out):
            plan.append(StageRun(stage, title, out, (), complete=True))
            continue
        ready = {run.stage.number for run in plan}  # stages before this one in the plan have run by then
        argv = _stage_arguments(stage, config_dir / config_of(stage), out,
                                _previous_output(output_dir, number, ready))
        if is_dmpo(stage):
            argv += ["--algorithm", "dmpo"]
        checkpoint = latest_checkpoint(out) if number > 0 else None
        broken = tuple(p for _, p in _checkpoints(out) if not is_complete_checkpoint(p)) if number > 0 else ()
        if checkpoint is not None:
            argv += ["--resume_from_checkpoint", str(checkpoint)]
        if number > 0:  # the tokenizer has nothing to distribute and no training options
            argv += list(extra_args)
        processes = cpu_processes if number in CPU_PARALLEL_STAGES else 1
        if processes > 1:
            argv += _split_batch_args(stage, config_dir / config_of(stage), extra_args, processes)
        plan.append(StageRun(stage, title, out, tuple(argv), False, checkpoint, broken, processes))
    return plan


def _run_in_process(run: StageRun) -> None:
    main = importlib.import_module(run.stage.entry_point).main
    try:
        main(list(run.argv))
    except SystemExit as stop:  # argparse errors and explicit exits
        if stop.code not in (0, None):
            raise CurriculumError(f"{run.stage.entry_point} exited with status {stop.code}") from stop


def _run_subprocess(command: list[str]) -> None:
    done = subprocess.run(command)
    if done.returncode:
        raise CurriculumError(f"{shlex.join(command)} failed with exit status {done.returncode}")


def run_curriculum(
    preset: str | os.PathLike,
    output_dir: str | os.PathLike,
    stages: str | Sequence[int] | None = None,
    *,
    algorithm: str = "impo",
    launcher: str | None = None,
    extra_args: Sequence[str] = (),
    cpu_processes: int = 1,
    threads: int = 1,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Run (or finish) the curriculum of ``preset`` into ``output_dir``; returns one report per stage.

    Args:
        preset: a shipped preset (``tiny``, ``mini``, ``micro``: :func:`presets`) or a path to a folder of stage
            YAML files.
        output_dir: where the stages write ``stage0`` ... ``stage5``.
        stages: which stages (``"0-5"``, ``"4,5"``, a list; default all stages the preset has configs for).
            A stage reads the newest complete earlier stage, which must exist or run first in this call.
        algorithm: stage 5 as ``"impo"`` (``stage5.yaml``) or ``"dmpo"`` (``stage5_dmpo.yaml``).
        launcher: e.g. ``"accelerate launch --multi_gpu --num_processes 2"``: run stages 1-5 as
            ``<launcher> -m transformers_rxt.training.stages.<stage> ...`` subprocesses (default: in this process).
        extra_args: appended to every training stage's arguments (stages 1-5), e.g. ``["--report_to",
            "tensorboard"]`` or ``["--use_cpu", "false"]``.
        cpu_processes: run stages 1-4 (:data:`CPU_PARALLEL_STAGES`) as this many data-parallel CPU processes
            (gloo DDP through ``accelerate launch``), each with 1/``cpu_processes`` of the stage's
            ``per_device_train_batch_size``, so the global batch is the preset's; it must divide each of those
            batches. Not with ``launcher``.
        threads: torch threads of each of those processes.
        log: where progress lines go.

    Each report is the stage's ``stage_report.json`` plus ``skipped`` (already complete before this call).
    """
    check_launch_options(launcher, cpu_processes)
    plan = plan_curriculum(preset, output_dir, stages, algorithm=algorithm, extra_args=extra_args,
                           cpu_processes=cpu_processes)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    reports = []
    for run in plan:
        report_file = run.output / REPORT_FILE
        if run.complete:
            log(f"[rxt train] {run.title}: already complete in {run.output}, skipped")
            reports.append({**json.loads(report_file.read_text()), "skipped": True})
            continue
        for broken in run.broken_checkpoints:
            log(f"[rxt train] {run.title}: {broken.name} is incomplete (the run stopped while writing it); "
                "not resuming from it")
        resuming = f" (resuming from {run.checkpoint.name})" if run.checkpoint else ""
        log(f"[rxt train] {run.title} -> {run.output}{resuming}")
        started = time.time()
        if run.processes > 1 or (launcher and run.stage.number > 0):
            _run_subprocess(run.command(launcher, threads))
        else:
            _run_in_process(run)
        if not is_complete(run.output):
            raise CurriculumError(f"{run.stage.entry_point} finished without writing {report_file}")
        report = json.loads(report_file.read_text())
        report.setdefault("wall_time_s", round(time.time() - started, 1))
        reports.append({**report, "skipped": False})
    return reports


def _previous_output(output_dir: Path, number: int, ready: set[int]) -> Path | None:
    """The input of stage ``number``: the newest earlier stage that is complete or runs before it (``ready``)."""
    if number == 0:
        return None
    if number == 1:  # stage 1 builds the model; it needs the stage-0 tokenizer
        if 0 not in ready and not is_complete(stage_dir(output_dir, 0)):
            raise FileNotFoundError(f"stage 1 needs the stage-0 tokenizer in {stage_dir(output_dir, 0)}; "
                                    "run stage 0 first (--stages 0-1)")
        return stage_dir(output_dir, 0)
    for earlier in range(number - 1, 0, -1):
        if earlier in ready or is_complete(stage_dir(output_dir, earlier)):
            return stage_dir(output_dir, earlier)
    raise FileNotFoundError(f"stage {number} starts from an earlier stage's model, but {output_dir} has none "
                            f"complete; run the earlier stages first (--stages 0-{number})")
