"""PEFT interop: exported adapters reproduce the bank; imported adapters become blocks."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

from neeko import model as model_lib
from neeko.errors import BlockFormatError, GateError
from neeko.lora import BankConfig, LoRABank
from neeko.peft_io import export_adapter, import_adapter, read_adapter

IDS = torch.tensor([[5, 87, 1200, 33, 4021, 9, 77, 310, 2, 1000]])


@pytest.fixture
def bank():
    loaded = model_lib.load("tiny")
    bank = LoRABank(loaded.model, BankConfig())
    bank.add_blocks(4, init="random", generator=torch.Generator().manual_seed(3))
    bank.model = loaded.model  # for the tests' convenience
    return bank


def _ours(bank, gate):
    with torch.inference_mode(), bank.route([gate]):
        return bank.model(IDS).logits


def _peft_logits(folder):
    model = PeftModel.from_pretrained(model_lib.load("tiny").model, str(folder))
    with torch.inference_mode():
        return model(IDS).logits


def test_exported_block_reproduces_our_logits(bank, tmp_path):
    export_adapter(bank, {2: 1.0}, tmp_path / "a")
    assert torch.allclose(_peft_logits(tmp_path / "a"), _ours(bank, {2: 1.0}), atol=1e-5)
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_exported_gate_mix_is_exact_rank_kp_adapter(bank, tmp_path):
    gate = {0: 0.5, 1: 0.3, 3: 0.2}
    export_adapter(bank, gate, tmp_path / "mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["r"] == 12
    assert config["lora_alpha"] / config["r"] == bank.config.scale
    assert torch.allclose(_peft_logits(tmp_path / "mix"), _ours(bank, gate), atol=1e-4)


def test_one_hot_gate_equals_plain_peft_lora(bank):
    """A PEFT LoRA built independently, holding block 1's weights, gives our one-hot logits."""
    peft = get_peft_model(
        model_lib.load("tiny").model,
        LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    block = bank.get_block(1)
    for name, module in peft.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in block:
            module.lora_A["default"].weight.data.copy_(block[key][0])
            module.lora_B["default"].weight.data.copy_(block[key][1])
    with torch.inference_mode():
        theirs = peft(IDS).logits
    assert torch.allclose(theirs, _ours(bank, {1: 1.0}), atol=1e-5)


def test_import_round_trip_is_exact(bank, tmp_path):
    export_adapter(bank, {3: 1.0}, tmp_path / "a")
    k = import_adapter(bank, tmp_path / "a")
    assert k == 4
    assert torch.equal(_ours(bank, {k: 1.0}), _ours(bank, {3: 1.0}))


def test_import_lower_rank_adapter_pads_and_rescales(bank, tmp_path):
    peft = get_peft_model(
        model_lib.load("tiny").model,
        LoraConfig(
            r=2, lora_alpha=7, target_modules=["q_proj"], lora_dropout=0.0, init_lora_weights=False
        ),
    )
    peft.save_pretrained(tmp_path / "r2")
    with torch.inference_mode():
        theirs = peft(IDS).logits
    k = import_adapter(bank, tmp_path / "r2")
    assert torch.allclose(_ours(bank, {k: 1.0}), theirs, atol=1e-5)


def _adapter(tmp_path, bank, **config_changes):
    folder = tmp_path / "bad"
    export_adapter(bank, {0: 1.0}, folder)
    config = json.loads((folder / "adapter_config.json").read_text()) | config_changes
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_bad_adapters_are_refused_and_change_nothing(bank, tmp_path):
    before = bank.get_block(0)
    cases = {
        "rank 16 exceeds": _adapter(tmp_path / "1", bank, r=16),
        "unsupported LoRA options": _adapter(tmp_path / "2", bank, use_dora=True),
        "not a LoRA adapter": _adapter(tmp_path / "3", bank, peft_type="IA3"),
    }
    missing = tmp_path / "missing"
    missing.mkdir()
    cases["no adapter_config.json"] = missing
    nan = _adapter(tmp_path / "4", bank)
    tensors = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.full(
            (4, 64), float("nan")
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
    }
    save_file(tensors, str(nan / "adapter_model.safetensors"))
    cases["NaN or inf"] = nan
    pickled = _adapter(tmp_path / "5", bank)
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({}, pickled / "adapter_model.bin")
    cases["pickled adapter_model.bin files are refused"] = pickled
    garbage = _adapter(tmp_path / "6", bank)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00not safetensors at all")
    cases["not a valid safetensors file"] = garbage
    for message, folder in cases.items():
        with pytest.raises(BlockFormatError, match=message):
            import_adapter(bank, folder)
    assert bank.n_blocks == 4
    after = bank.get_block(0)
    assert all(torch.equal(before[n][0], after[n][0]) for n in before)


def test_adapter_for_modules_the_bank_does_not_wrap(bank, tmp_path):
    peft = get_peft_model(
        model_lib.load("tiny").model,
        LoraConfig(r=4, lora_alpha=32, target_modules=["o_proj"], init_lora_weights=False),
    )
    peft.save_pretrained(tmp_path / "o")
    with pytest.raises(BlockFormatError, match="does not wrap"):
        read_adapter(bank, tmp_path / "o")
    assert bank.n_blocks == 4


def test_export_refuses_empty_or_unknown_gates(bank, tmp_path):
    with pytest.raises(GateError, match="empty gate"):
        export_adapter(bank, {}, tmp_path / "x")
    with pytest.raises(GateError, match="does not exist"):
        export_adapter(bank, {9: 1.0}, tmp_path / "x")
    assert not (tmp_path / "x").exists()
