"""scripts/gpu_check.sh: the GPU check's CPU dry run runs every check end to end (CI has no GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_cpu_dry_run_passes_every_check():
    env = dict(os.environ, RXT_VENV=str(Path(sys.executable).parents[1]))
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows.pop("check") == "status"
    assert rows == {"rxt-sdpa-bfloat16": "PASS", "rxt-flash_attention_2-bfloat16": "SKIP",
                    "sqa-kernel-bfloat16": "PASS", "async-vs-sync-update": "PASS", "tensorbleu-vs-nltk": "PASS",
                    "sqa-long-1k": "PASS", "sqa-long-2k": "PASS"}, result.stdout


def test_gpu_check_fails_without_cuda_unless_dry_run_and_on_a_failed_row():
    gpu_check = load_gpu_check()
    if not gpu_check.torch.cuda.is_available():
        try:
            gpu_check.run_checks(cpu=False)
        except SystemExit as err:
            assert "no CUDA device visible" in str(err) and "--cpu" in str(err)
        else:
            raise AssertionError("run_checks(cpu=False) ran without CUDA")
    rows = [gpu_check.Row("a", "PASS", "", ""), gpu_check.Row("b", "SKIP", "", "")]
    assert gpu_check.exit_status(rows) == 0
    assert gpu_check.exit_status(rows + [gpu_check.Row("c", "FAIL", "", "")]) == 1
