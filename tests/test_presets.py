"""Every preset YAML under trainers/configs parses with its stage script's argument dataclasses (a misspelt or
stale key fails here, not after an hour on a GPU), and the presets agree on their stage-to-stage paths."""

import runpy
import sys
from pathlib import Path

import pytest
import yaml

TRAINERS = Path(__file__).resolve().parents[1] / "trainers"
SCRIPTS = {"stage0": "stage0_tokenizer.py", "stage1": "stage1_joint_pretrain.py", "stage2": "stage2_joint_sft.py",
           "stage3": "stage3_memory_attention.py", "stage4": "stage4_memory_aware.py", "stage5": "stage5_impo.py",
           "stage5_dmpo": "stage5_impo.py"}
CONFIGS = sorted(p for p in (TRAINERS / "configs").glob("*/stage*.yaml"))


class Parsed(Exception):
    """Raised by the patched parser once the arguments are built, so that no training starts."""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_preset_parses_with_its_script(config, monkeypatch):
    from trl import TrlParser

    monkeypatch.syspath_prepend(str(TRAINERS))
    import common

    parsed = {}

    def parse_only(*dataclass_types):
        # CPU overrides: the GPU presets ask for bf16, which the arguments refuse without a GPU
        overrides = ["--use_cpu", "true", "--bf16", "false"] if config.stem != "stage0" else []
        parsed["args"] = TrlParser(dataclass_types=list(dataclass_types)).parse_args_and_config(
            args=["--config", str(config), *overrides])
        raise Parsed

    monkeypatch.setattr(common, "parse", parse_only)
    monkeypatch.delitem(sys.modules, "stage1_joint_pretrain", raising=False)  # stage 2 imports it: re-import
    algorithm = ["--algorithm", "dmpo"] if config.stem == "stage5_dmpo" else []
    monkeypatch.setattr(sys, "argv", [SCRIPTS[config.stem], "--config", str(config), *algorithm])
    with pytest.raises(Parsed):
        runpy.run_path(str(TRAINERS / SCRIPTS[config.stem]), run_name="__main__")
    values = {k: v for obj in parsed["args"] for k, v in vars(obj).items()}
    for key, value in yaml.safe_load(config.read_text()).items():
        if key in ("use_cpu", "bf16"):
            continue
        assert key in values, f"{config}: {key!r} is not an argument of {SCRIPTS[config.stem]}"


@pytest.mark.parametrize("preset", sorted(p.name for p in (TRAINERS / "configs").iterdir() if p.is_dir()
                                           and p.name != "accelerate"))  # accelerate configs, not a preset
def test_preset_stages_chain(preset):
    """Each stage reads the previous stage's default output (the paths `rxt train` overrides anyway)."""
    folder = TRAINERS / "configs" / preset
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in folder.glob("stage*.yaml")}
    assert configs["stage1"]["tokenizer"] == configs["stage0"]["output_dir"]
    for n in range(2, 6):
        if f"stage{n}" in configs:
            assert configs[f"stage{n}"]["init_from"] == configs[f"stage{n - 1}"]["output_dir"], (preset, n)
    assert (folder / "model.yaml").is_file()
