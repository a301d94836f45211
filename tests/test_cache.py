"""STMCache: row selection, concatenation, reset, moves, persistence and ownership."""

import json

import pytest
import torch
from safetensors.torch import save_file

from transformers_rxt import RxTForConversationalGeneration, STMCache
from transformers_rxt.cache_rxt import STM_FORMAT_VERSION

from rxt_factories import tiny_model


def _stm_file(path, memory, version, signature=None):
    metadata = {"format": "rxt-stm", "version": version, "model_signature": json.dumps(signature or {})}
    save_file({"memory": memory}, str(path), metadata=metadata)
    return path


# ------------------------------------------------------------------------------------------- rows
def test_stm_row_selection_concatenation_reset_and_moves():
    model = tiny_model()
    stm = model.init_memory(3, generator=torch.Generator().manual_seed(0))
    pair = stm.select([0, 2])
    assert torch.equal(pair.memory, stm.memory[[0, 2]])
    joined = STMCache.cat([pair, stm[1:2]])
    assert torch.equal(joined.memory, stm.memory[[0, 2, 1]])
    before = stm.memory.clone()
    stm.reset(rows=[1], init_type="zeros")
    assert torch.equal(stm.memory[1], torch.zeros_like(before[1])) and torch.equal(stm.memory[0], before[0])
    half = stm.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and stm.dtype == torch.float32
    assert stm.clone().memory.data_ptr() != stm.memory.data_ptr()
    with pytest.raises(ValueError, match="different models"):
        STMCache.cat([stm, tiny_model(slots=4).init_memory(1)])


def test_boolean_masks_select_rows_and_other_non_integer_indices_are_refused():
    stm = tiny_model().init_memory(4, generator=torch.Generator().manual_seed(0))
    finished = [False, True, False, True]
    for mask in ([True, False, True, False], torch.tensor(finished).logical_not()):
        assert torch.equal(stm.select(mask).memory, stm.memory[[0, 2]])  # was rows [1, 0, 1, 0]
    assert torch.equal(stm[torch.tensor([3, -4])].memory, stm.memory[[3, 0]])
    assert stm.select([]).batch_size == 0
    with pytest.raises(IndexError, match="one entry per conversation: got shape \\(3,\\)"):
        stm.select([True, False, True])
    with pytest.raises(TypeError, match="integer indices or a boolean mask, got a torch.float32"):
        stm.select([0.0, 2.7])  # was truncated to rows [0, 2]
    with pytest.raises(TypeError, match="integer indices or a boolean mask, got a torch.float64"):
        stm.select(torch.tensor([1.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="a single bool"):
        stm.select(True)
    with pytest.raises(IndexError, match="out of range for an STMCache of batch 4"):
        stm.select([4])
    before = stm.memory.clone()
    stm.reset(rows=torch.tensor(finished), init_type="zeros")
    assert torch.equal(stm.memory[[1, 3]], torch.zeros_like(before[[1, 3]]))
    assert torch.equal(stm.memory[[0, 2]], before[[0, 2]])


# ------------------------------------------------------------------------------------------- persistence
def test_stm_save_load_round_trip_bit_for_bit(tmp_path):
    model = tiny_model()
    stm = model.init_memory(3)
    stm.save(tmp_path / "stm.safetensors")
    loaded = STMCache.load(tmp_path / "stm.safetensors", model=model)
    assert torch.equal(loaded.memory, stm.memory) and loaded.model_signature == stm.model_signature
    other = tiny_model(slots=4)
    with pytest.raises(ValueError, match="slots"):
        STMCache.load(tmp_path / "stm.safetensors", model=other)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.safetensors is not an STMCache file"):
        STMCache.load(tmp_path / "bad.safetensors")


def test_load_refuses_unknown_file_format_versions(tmp_path):
    memory = tiny_model().init_memory(1).memory
    for version in ("99", "1"):
        path = _stm_file(tmp_path / f"v{version}.safetensors", memory, version)
        with pytest.raises(ValueError, match=f"format version '{version}'; this transformers-rxt reads version "
                                             f"{STM_FORMAT_VERSION} only"):
            STMCache.load(path)
    current = _stm_file(tmp_path / "current.safetensors", memory, str(STM_FORMAT_VERSION))
    assert torch.equal(STMCache.load(current).memory, memory)


# ------------------------------------------------------------------------------------------- ownership
def test_a_memory_is_refused_by_another_model_of_the_same_geometry(tmp_path):
    model = tiny_model()
    other = tiny_model(decoder=dict(ff_dim=64))  # same layers, slots and dim; another architecture
    assert other.model_signature["fingerprint"] != model.model_signature["fingerprint"]
    stm = model.init_memory(1)
    prompt = torch.tensor([[2, 5, 30, 31, 6]])
    both = f"{stm.model_signature['fingerprint']}.*{other.model_signature['fingerprint']}"
    with pytest.raises(ValueError, match=f"belongs to another model.*{both}"):
        other.generate(prompt, stm=stm, max_new_tokens=2)
    with pytest.raises(ValueError, match=f"belongs to another model.*{both}"):
        other.update_memory(torch.tensor([[2, 5, 30, 6, 40, 3]]), stm=stm)
    stm.save(tmp_path / "stm.safetensors")
    with pytest.raises(ValueError, match=f"belongs to another model.*{both}"):
        STMCache.load(tmp_path / "stm.safetensors", model=other)
    with pytest.raises(ValueError, match="different models"):
        STMCache.cat([stm, other.init_memory(1)])
    assert not stm.update_pending and torch.equal(STMCache.load(tmp_path / "stm.safetensors").memory, stm.memory)


def test_a_bare_memory_is_accepted_and_bound_to_the_first_model_that_uses_it(tmp_path):
    model = tiny_model()
    other = tiny_model(decoder=dict(ff_dim=64))
    bare = STMCache(torch.randn(1, 2, 8, 32))
    assert bare.model_signature is None
    joined = STMCache.cat([bare, model.init_memory(1)])  # an unbound cache joins a bound one
    assert joined.model_signature == model.model_signature
    model.generate(torch.tensor([[2, 5, 30, 31, 6]]), stm=bare, max_new_tokens=2)
    assert bare.model_signature == model.model_signature
    with pytest.raises(ValueError, match="belongs to another model"):
        other.generate(torch.tensor([[2, 5, 30, 31, 6]]), stm=bare, max_new_tokens=2)
    _stm_file(tmp_path / "bare.safetensors", torch.randn(1, 2, 8, 32), str(STM_FORMAT_VERSION))
    assert STMCache.load(tmp_path / "bare.safetensors", model=other).model_signature == other.model_signature


def test_the_fingerprint_survives_save_pretrained_and_ignores_runtime_options(tmp_path):
    model = tiny_model()
    stm = model.init_memory(1)
    model.save_pretrained(tmp_path / "model")
    reloaded = RxTForConversationalGeneration.from_pretrained(tmp_path / "model")
    assert reloaded.model_signature == model.model_signature
    stm.save(tmp_path / "stm.safetensors")
    assert torch.equal(STMCache.load(tmp_path / "stm.safetensors", model=reloaded).memory, stm.memory)
    dropout = tiny_model(decoder=dict(att_dropout=0.1), memory=dict(att_dropout=0.1))
    assert dropout.model_signature == model.model_signature
