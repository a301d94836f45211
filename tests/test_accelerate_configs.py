"""The accelerate configs shipped for multi-GPU training (issue 18) are valid accelerate configs and match the
model (FSDP without per-layer units; the outputs are full HF directories)."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file


CONFIGS = Path(__file__).resolve().parents[1] / "trainers" / "configs" / "accelerate"


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("deepspeed_zero2", "DEEPSPEED"),
                                        ("deepspeed_zero3", "DEEPSPEED")])
def test_accelerate_config_loads(name, kind):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == kind and config.num_machines == 1
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        # one unit for the model (per-RxTLayer units fail: the memory K/V are projected outside the layer's forward);
        # tests/test_training_distributed.py trains stages 1 and 4 sharded with this file
        assert fsdp["fsdp_auto_wrap_policy"] == "NO_WRAP" and "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    if kind == "DEEPSPEED":
        stage = int(name[-1])
        assert config.deepspeed_config["zero_stage"] == stage
        assert stage == 2 or config.deepspeed_config["zero3_save_16bit_model"] is True


def test_every_shipped_config_is_tested():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == {"ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"}
