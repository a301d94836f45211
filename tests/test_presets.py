"""Every preset YAML parses with its stage's argument dataclasses (a misspelt or stale key fails here, not after
an hour on a GPU), the presets agree on their stage-to-stage paths, the presets have one home (package data,
``trainers/configs`` is a link to it), and ``trainers/`` holds only thin launchers of the package's stages."""

import importlib
import importlib.util
import tomllib
from pathlib import Path

import pytest
import yaml

from transformers_rxt.curriculum import STAGES, preset_dir, presets, presets_root

REPO = Path(__file__).resolve().parents[1]
TRAINERS = REPO / "trainers"
MODULES = {f"stage{s.number}": s.entry_point for s in STAGES} | {"stage5_dmpo": STAGES[5].entry_point}
CONFIGS = sorted(p for p in presets_root().glob("*/stage*.yaml"))


class Parsed(Exception):
    """Raised by the patched parser once the arguments are built, so that no training starts."""


def test_presets_ship_as_package_data():
    assert presets() == ["micro", "mini", "tiny"]
    assert presets_root() == (REPO / "transformers_rxt" / "presets").resolve()
    assert len(CONFIGS) == 3 * 7
    with pytest.raises(ValueError, match=r"unknown preset 'huge': expected one of \['micro', 'mini', 'tiny'\]"):
        preset_dir("huge")
    with pytest.raises(ValueError, match="unknown preset 'accelerate'"):  # launcher configs, not a preset
        preset_dir("accelerate")


def test_trainers_configs_is_the_package_presets():
    """One copy of the presets: the checkout's documented paths (trainers/configs/<preset>/stageN.yaml) are a link
    into the package, so an edit through either path changes the same file."""
    link = TRAINERS / "configs"
    assert link.is_symlink(), "trainers/configs must be a link to ../transformers_rxt/presets, not a copy"
    assert link.resolve() == presets_root()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "data-files" not in pyproject["tool"]["setuptools"]  # nothing installed outside the package
    assert "presets/*/*.yaml" in pyproject["tool"]["setuptools"]["package-data"]["transformers_rxt"]


@pytest.mark.parametrize("stage", STAGES, ids=lambda s: s.script)
def test_trainers_scripts_are_thin_launchers(stage):
    """trainers/<stage>.py (python or accelerate launch) runs the package's entry point, nothing of its own."""
    spec = importlib.util.spec_from_file_location(f"launcher_{stage.module}", TRAINERS / stage.script)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)  # not as __main__: defines `main` without running it
    assert launcher.main is importlib.import_module(stage.entry_point).main
    assert {name for name in vars(launcher) if not name.startswith("__")} == {"main"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_parses_with_its_stage(config, monkeypatch):
    from trl import TrlParser

    parsed = {}
    original = TrlParser.parse_args_and_config

    def parse_only(self, args=None, **kwargs):
        # CPU overrides: the GPU presets ask for bf16, which the arguments refuse without a GPU
        overrides = ["--use_cpu", "true", "--bf16", "false"] if config.stem != "stage0" else []
        parsed["args"] = original(self, args=[*args, *overrides], **kwargs)
        raise Parsed

    monkeypatch.setattr(TrlParser, "parse_args_and_config", parse_only)
    algorithm = ["--algorithm", "dmpo"] if config.stem == "stage5_dmpo" else []
    with pytest.raises(Parsed):
        importlib.import_module(MODULES[config.stem]).main(["--config", str(config), *algorithm])
    values = {k: v for obj in parsed["args"] for k, v in vars(obj).items()}
    for key in yaml.safe_load(config.read_text()):
        if key in ("use_cpu", "bf16"):
            continue
        assert key in values, f"{config}: {key!r} is not an argument of {MODULES[config.stem]}"
    if config.stem.startswith("stage5"):
        assert values["algorithm"] == ("dmpo" if config.stem == "stage5_dmpo" else "impo")


def test_stage5_refuses_an_unknown_algorithm():
    from transformers_rxt.training.stages.stage5_impo import main

    with pytest.raises(ValueError, match="--algorithm 'ppo': expected 'impo' or 'dmpo'"):
        main(["--config", str(preset_dir("micro") / "stage5.yaml"), "--algorithm", "ppo"])


@pytest.mark.parametrize("preset", ["micro", "mini", "tiny"])
def test_preset_stages_chain(preset):
    """Each stage reads the previous stage's default output (the paths `rxt train` overrides anyway)."""
    folder = preset_dir(preset)
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("stage*.yaml")}
    assert configs["stage1"]["tokenizer"] == configs["stage0"]["output_dir"]
    for n in range(2, 6):
        if f"stage{n}" in configs:
            assert configs[f"stage{n}"]["init_from"] == configs[f"stage{n - 1}"]["output_dir"], (preset, n)
    assert (folder / "model.yaml").is_file()
