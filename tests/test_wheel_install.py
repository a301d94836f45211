"""A wheel install runs the curriculum without the source checkout (issue 18): the stages, their presets and the
benchmarks are in the package, nothing is installed as data files, and `rxt train` / `rxt bench` work from a
folder that has no trainers/ or benchmarks/ next to it."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    # a copy of the sources: setuptools builds in the source folder (build/), where files of an earlier build
    # would end up in the wheel
    source = dist / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in ("transformers_rxt", "transformers_rxt_cli", "trainers", "benchmarks", "model_cards"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "MANIFEST.in", "README.md", "LICENSE", "NOTICE"):
        shutil.copy(REPO / name, source / name)
    # offline: the build uses this environment's setuptools (no isolated build environment to download)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(dist), str(source)], check=True, capture_output=True, timeout=600)
    (found,) = dist.glob("transformers_rxt-*.whl")
    return found


def test_wheel_holds_the_stages_presets_and_benchmarks_and_no_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("micro", "tiny", "mini"):
        assert {f"transformers_rxt/presets/{preset}/{f}.yaml" for f in ("model", "stage0", "stage4", "stage5")} <= names
    assert "transformers_rxt/presets/accelerate/fsdp2.yaml" in names
    assert {f"transformers_rxt/training/stages/{m}.py" for m in (
        "common", "stage0_tokenizer", "stage1_joint_pretrain", "stage2_joint_sft", "stage3_memory_attention",
        "stage4_memory_aware", "stage5_impo")} <= names
    assert {f"transformers_rxt/benchmarks/bench_{b}.py" for b in ("inference", "tensorbleu", "sqa", "memory")} <= names
    assert not [n for n in names if ".data/" in n or n.startswith(("trainers/", "benchmarks/"))]


def test_wheel_install_trains_and_benchmarks_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
                    str(wheel)], check=True, capture_output=True, timeout=300)
    out = tmp_path / "out"
    code = textwrap.dedent(f"""
        import transformers_rxt
        from transformers_rxt_cli import main
        print("PACKAGE", transformers_rxt.__file__)
        assert main(["train", "--preset", "micro", "--output", {str(out)!r}, "--dry-run"]) == 0
        assert main(["train", "--preset", "micro", "--output", {str(out)!r}, "--stages", "0-1", "--eval-dialogues",
                     "0", "--no-hub", "--", "--max_steps", "1", "--disable_tqdm", "true"]) == 0
        assert main(["bench", "tensorbleu", "--batches", "2", "--lengths", "8", "--repeats", "1",
                     "--no-sacrebleu"]) == 0
    """)
    # the installed copy first on the path; the test's own (editable) install stays importable for the dependencies
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"PACKAGE {site / 'transformers_rxt' / '__init__.py'}" in proc.stdout
    presets = site / "transformers_rxt" / "presets" / "micro"
    # the dry run: every stage with the installed preset, nothing written
    assert f"-m transformers_rxt.training.stages.stage4_memory_aware --config {presets / 'stage4.yaml'} " \
           f"--output_dir {out / 'stage4'} --init_from {out / 'stage3'}" in proc.stdout
    assert "stage 5 (memory reinforcement learning (IMPO))" in proc.stdout
    assert (out / "stage1" / "stage_report.json").is_file() and not (out / "stage2").exists()
    assert "[rxt train] stage 1 (joint LM pre-training)" in proc.stdout
    assert "TensorBLEU" in proc.stdout
