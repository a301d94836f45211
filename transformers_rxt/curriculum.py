"""Run a preset's whole training curriculum, stage by stage, resumably (what ``rxt train`` does).

Every stage is one of the ``trainers/`` scripts with its preset YAML (``trainers/configs/<preset>/``). The
runner points each stage at the previous stage's output under one directory::

    OUT/stage0  tokenizer                OUT/stage3  memory-attention pre-training
    OUT/stage1  joint LM pre-training    OUT/stage4  supervised memory-aware training
    OUT/stage2  joint SFT                OUT/stage5  IMPO (or DMPO)

A stage whose directory already holds ``stage_report.json`` (written after its model is saved) is complete
and skipped; a stage that stopped part-way restarts from its newest complete ``checkpoint-*`` directory
(presets that save checkpoints; one the run was killed while writing is passed over). So running the same
command again continues an interrupted run where it stopped.

Stages run in this process by default (no re-import per stage); ``launcher="accelerate launch ..."`` runs each
training stage as a subprocess under that launcher instead (several GPUs or processes).
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CurriculumError", "STAGES", "Stage", "find_source_dir", "find_trainers_dir", "parse_stages",
           "is_complete_checkpoint", "latest_checkpoint", "run_curriculum", "stage_dir", "final_stage_dir"]


class CurriculumError(RuntimeError):
    """A stage failed or left no result (the message names the stage and the command)."""


@dataclass(frozen=True)
class Stage:
    """One curriculum stage: its number, the stage name model cards use, its script and preset file."""

    number: int
    name: str
    title: str
    script: str
    config: str


STAGES: tuple[Stage, ...] = (
    Stage(0, "tokenizer", "tokenizer", "stage0_tokenizer.py", "stage0.yaml"),
    Stage(1, "joint-pretraining", "joint LM pre-training", "stage1_joint_pretrain.py", "stage1.yaml"),
    Stage(2, "joint-sft", "joint interaction SFT", "stage2_joint_sft.py", "stage2.yaml"),
    Stage(3, "memory-attention-pretraining", "memory-attention pre-training", "stage3_memory_attention.py",
          "stage3.yaml"),
    Stage(4, "supervised-memory-aware", "supervised memory-aware training", "stage4_memory_aware.py",
          "stage4.yaml"),
    Stage(5, "mrl", "memory reinforcement learning (IMPO)", "stage5_impo.py", "stage5.yaml"),
)
DMPO_CONFIG = "stage5_dmpo.yaml"
REPORT_FILE = "stage_report.json"


def find_source_dir(name: str, marker: str, explicit: str | os.PathLike | None = None) -> Path:
    """A folder of scripts that ships beside the library (``trainers``, ``benchmarks``): ``explicit``,
    ``$RXT_<NAME>_DIR``, the source checkout this package runs from, the copy a wheel install puts under
    ``<prefix>/share/transformers-rxt/``, or ``./<name>``; the first that holds ``marker``."""
    candidates = [explicit, os.environ.get(f"RXT_{name.upper()}_DIR"), Path(__file__).resolve().parents[1] / name,
                  Path(sys.prefix) / "share" / "transformers-rxt" / name, Path.cwd() / name]
    for candidate in candidates:
        if candidate and (Path(candidate) / marker).is_file():
            return Path(candidate).resolve()
    raise FileNotFoundError(
        f"cannot find the {name}/ folder (with {marker}): it ships with the source checkout and, for wheel installs, "
        f"under {Path(sys.prefix) / 'share' / 'transformers-rxt'}. Point RXT_{name.upper()}_DIR at a copy"
        + (" or pass --trainers-dir." if name == "trainers" else "."))


def find_trainers_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The ``trainers/`` folder of stage scripts and presets (see :func:`find_source_dir`)."""
    return find_source_dir("trainers", STAGES[1].script, explicit)


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


def _run_in_process(script: Path, argv: list[str]) -> None:
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [str(script), *argv]
    sys.path.insert(0, str(script.parent))  # the scripts import their shared helpers as `common`
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as stop:  # argparse errors and explicit exits
        if stop.code not in (0, None):
            raise CurriculumError(f"{script.name} exited with status {stop.code}") from stop
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def _run_subprocess(launcher: str, script: Path, argv: list[str], cwd: Path) -> None:
    command = [*shlex.split(launcher), str(script), *argv]
    done = subprocess.run(command, cwd=cwd)
    if done.returncode:
        raise CurriculumError(f"{shlex.join(command)} failed with exit status {done.returncode}")


def run_curriculum(
    preset: str,
    output_dir: str | os.PathLike,
    stages: str | Sequence[int] | None = None,
    *,
    algorithm: str = "impo",
    launcher: str | None = None,
    extra_args: Sequence[str] = (),
    trainers_dir: str | os.PathLike | None = None,
    log: Callable[[str], Any] = print,
) -> list[dict[str, Any]]:
    """Run (or finish) the curriculum of ``preset`` into ``output_dir``; returns one report per stage.

    Args:
        preset: a folder name under ``trainers/configs`` (``tiny``, ``mini``, ``micro``) or a path to one.
        output_dir: where the stages write ``stage0`` ... ``stage5``.
        stages: which stages (``"0-5"``, ``"4,5"``, a list; default all stages the preset has configs for).
            A stage reads the newest complete earlier stage, which must exist.
        algorithm: stage 5 as ``"impo"`` (``stage5.yaml``) or ``"dmpo"`` (``stage5_dmpo.yaml``).
        launcher: e.g. ``"accelerate launch --multi_gpu --num_processes 2"``: run stages 1-5 as subprocesses
            under it (default: in this process).
        extra_args: appended to every training stage's arguments (stages 1-5), e.g. ``["--report_to",
            "tensorboard"]`` or ``["--use_cpu", "false"]``.
        trainers_dir: the ``trainers/`` folder (default: :func:`find_trainers_dir`).
        log: where progress lines go.

    Each report is the stage's ``stage_report.json`` plus ``skipped`` (already complete before this call).
    """
    if algorithm not in ("impo", "dmpo"):
        raise ValueError(f"algorithm must be 'impo' or 'dmpo', got {algorithm!r}")
    trainers = find_trainers_dir(trainers_dir)
    given_folder = Path(preset).is_dir()
    config_dir = Path(preset) if given_folder else trainers / "configs" / preset
    # a named preset has a model.yaml (configs/accelerate holds accelerate configs, not a preset)
    if not config_dir.is_dir() or (not given_folder and not (config_dir / "model.yaml").is_file()):
        presets = sorted(p.name for p in (trainers / "configs").iterdir() if (p / "model.yaml").is_file())
        raise ValueError(f"unknown preset {preset!r}: expected one of {presets} or a folder of stage YAML files")
    config_dir = config_dir.resolve()

    def config_of(stage: Stage) -> str:
        return DMPO_CONFIG if is_dmpo(stage) else stage.config

    def is_dmpo(stage: Stage) -> bool:
        return stage.number == 5 and algorithm == "dmpo"

    available = [s.number for s in STAGES if (config_dir / config_of(s)).is_file()]
    wanted = available if stages is None else parse_stages(stages)
    missing = [n for n in wanted if n not in available]
    if missing:
        raise ValueError(f"preset {preset!r} has no configuration for stage(s) {missing} "
                         f"(files in {config_dir}: {sorted(p.name for p in config_dir.glob('*.yaml'))})")
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    reports = []
    for number in wanted:
        stage = STAGES[number]
        out = stage_dir(output_dir, number)
        title = f"stage {number} ({stage.title}{', DMPO' if is_dmpo(stage) else ''})"
        if is_complete(out):
            log(f"[rxt train] {title}: already complete in {out}, skipped")
            reports.append({**json.loads((out / REPORT_FILE).read_text()), "skipped": True})
            continue
        argv = _stage_arguments(stage, config_dir / config_of(stage), out, _previous_output(output_dir, number))
        if is_dmpo(stage):
            argv += ["--algorithm", "dmpo"]
        checkpoint = latest_checkpoint(out) if number > 0 else None
        for _, broken in _checkpoints(out) if number > 0 else ():
            if not is_complete_checkpoint(broken):
                log(f"[rxt train] {title}: {broken.name} is incomplete (the run stopped while writing it); "
                    "not resuming from it")
        if checkpoint is not None:
            argv += ["--resume_from_checkpoint", str(checkpoint)]
        log(f"[rxt train] {title} -> {out}" + (f" (resuming from {checkpoint.name})" if checkpoint else ""))
        started = time.time()
        if number == 0:  # the tokenizer: nothing to distribute, no training options
            _run_in_process(trainers / stage.script, argv)
        elif launcher:
            _run_subprocess(launcher, trainers / stage.script, [*argv, *extra_args], cwd=trainers.parent)
        else:
            _run_in_process(trainers / stage.script, [*argv, *extra_args])
        if not is_complete(out):
            raise CurriculumError(f"{stage.script} finished without writing {out / REPORT_FILE}")
        report = json.loads((out / REPORT_FILE).read_text())
        report.setdefault("wall_time_s", round(time.time() - started, 1))
        reports.append({**report, "skipped": False})
    return reports


def _previous_output(output_dir: Path, number: int) -> Path | None:
    if number == 0:
        return None
    if number == 1:  # stage 1 builds the model; it needs the stage-0 tokenizer
        if not is_complete(stage_dir(output_dir, 0)):
            raise FileNotFoundError(f"stage 1 needs the stage-0 tokenizer in {stage_dir(output_dir, 0)}; "
                                    "run stage 0 first (--stages 0-1)")
        return stage_dir(output_dir, 0)
    for earlier in range(number - 1, 0, -1):
        if is_complete(stage_dir(output_dir, earlier)):
            return stage_dir(output_dir, earlier)
    raise FileNotFoundError(f"stage {number} starts from an earlier stage's model, but {output_dir} has none "
                            f"complete; run the earlier stages first (--stages 0-{number})")
