"""Dependencies (issue 18): ranges in pyproject.toml, exact pins only in ci/constraints.txt, and a core that
imports and runs without the optional extras."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
PINS = {
    canonicalize_name(name): Version(version)
    for name, version in (
        line.split("==") for line in (REPO / "ci" / "constraints.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
}
#: what the core must not import: the extras' packages (PyYAML is not among them: huggingface_hub imports it)
EXTRA_ONLY = ("trl", "datasets", "evaluate", "peft", "fastapi", "uvicorn", "redis")


def requirements() -> list[Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    for extra in PROJECT["optional-dependencies"].values():
        reqs += [Requirement(r) for r in extra if not r.startswith("transformers-rxt")]
    return reqs


def test_pyproject_has_ranges_and_the_constraints_pin_inside_them():
    for req in requirements():
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"{req}: exact pin in pyproject"
        name = canonicalize_name(req.name)
        if name == "flash-attn":  # CUDA only, never installed by CI
            continue
        assert name in PINS, f"{req.name} has no exact pin in ci/constraints.txt"
        assert req.specifier.contains(PINS[name], prereleases=True), f"pin {name}=={PINS[name]} outside {req}"
    core = {canonicalize_name(Requirement(r).name): Requirement(r) for r in PROJECT["dependencies"]}
    assert str(core["transformers"].specifier) == "<6,>=5.23"
    # the extras hold what only the curriculum needs; numpy is not ours to declare (we never import it)
    assert {"trl", "datasets", "pyyaml", "numpy"}.isdisjoint(core)
    assert {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["train"]} == {
        "trl", "datasets", "pyyaml"}
    sources = [p.read_text() for p in (REPO / "transformers_rxt").rglob("*.py")]
    assert not any("import numpy" in s or "from numpy" in s for s in sources)


BLOCK = textwrap.dedent(f"""
    import importlib.machinery, sys
    BLOCKED = {set(EXTRA_ONLY)!r}

    class NotInstalled(importlib.machinery.PathFinder):  # the blocked packages look uninstalled
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return super().find_spec(name, path, target)

    sys.meta_path[:] = [NotInstalled if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")


def run_without_extras(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_core_imports_and_trains_without_the_extras():
    proc = run_without_extras("""
        import torch
        import transformers_rxt, transformers_rxt.training, transformers_rxt.data, transformers_rxt.hub
        from transformers_rxt import RxTConfig, RxTForConversationalGeneration
        from transformers_rxt.data import DataCollatorForRxTDecoder
        from transformers_rxt.training import JointLMConfig, JointLMTrainer

        sys.path.insert(0, "tests")
        from rxt_factories import tiny_config
        model = RxTForConversationalGeneration(tiny_config())
        rows = [{"input_ids": list(range(5, 17))} for _ in range(4)]
        args = JointLMConfig(output_dir="/tmp/unused", max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True)
        JointLMTrainer(model, args, train_dataset=rows).train()
        for name in BLOCKED:
            assert name not in sys.modules, name
        from transformers_rxt.data import load_mrl_dataset
        try:
            load_mrl_dataset("nowhere.jsonl")
        except ImportError as error:
            print("ERROR:", error)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ERROR: this needs the optional dependency 'datasets', which is not installed: pip install " \
           "'transformers-rxt[train]'" in proc.stdout
