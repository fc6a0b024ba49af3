"""The block bank: exactness of the three paths, isolation of blocks, files, bad input."""

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from neeko import model as neeko_model
from neeko.errors import BlockFormatError, GateError
from neeko.lora import BankConfig, BlockLoRALinear, LoRABank

# One-hot rows, a soft mix of 3 blocks, a zero row, a signed mix of 2.
GATES = [{1: 1.0}, {0: 0.5, 2: 0.3, 5: 0.2}, None, {4: 1.0}, {3: -0.7, 4: 1.3}]
PATHS = ["dense", "gathered", "reference"]


def _ids(batch: int = len(GATES), seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 49152, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(bank: LoRABank, model: nn.Module, ids: torch.Tensor, gates, path=None):
    with torch.no_grad(), bank.route(bank.routing(gates, path=path)):
        return model(ids).logits


def _snapshot(bank: LoRABank) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    n = bank.n_blocks
    return {name: (lay.A[:n].clone(), lay.B[:n].clone()) for name, lay in bank.layers.items()}


def _assert_unchanged(bank: LoRABank, snap) -> None:
    assert bank.n_blocks == next(iter(snap.values()))[0].shape[0]
    assert all(layer.n_blocks == bank.n_blocks for layer in bank.layers.values())
    for name, (a, b) in snap.items():
        layer = bank.layers[name]
        assert torch.equal(layer.A[: bank.n_blocks], a)
        assert torch.equal(layer.B[: bank.n_blocks], b)


# -- exactness ---------------------------------------------------------------------------


@pytest.mark.parametrize("gates", [GATES, [GATES[1]] * 3], ids=["mixed", "uniform"])
@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_layer_paths_match_reference(bank, path, gates):
    x = torch.randn(len(gates), 5, 64, generator=torch.Generator().manual_seed(2))
    for layer in bank.layers.values():
        with torch.no_grad():
            with bank.route(bank.routing(gates, path="reference")):
                ref = layer(x)
            with bank.route(bank.routing(gates, path=path)):
                out = layer(x)
        assert out.shape == (len(gates), 5, layer.out_features)
        assert (out - ref).abs().max() <= 1e-5
        assert (ref - layer.base(x)).abs().amax(dim=(1, 2)).gt(1e-2).tolist() == [
            g is not None for g in gates
        ]


@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_model_paths_match_reference(tiny, bank, path):
    assert bank.routing(GATES, path=path).path == path
    ids = _ids()
    ref = _logits(bank, tiny.model, ids, GATES, "reference")
    out = _logits(bank, tiny.model, ids, GATES, path)
    assert (out - ref).abs().max() <= 5e-5


@pytest.mark.parametrize("path", PATHS)
def test_one_hot_gate_is_lora_formula(bank, path):
    k = 3
    layer = bank.layers["model.layers.1.self_attn.v_proj"]
    x = torch.randn(2, 4, layer.in_features, generator=torch.Generator().manual_seed(3))
    a, b, w0 = layer.A[k], layer.B[k], layer.base.weight
    want = x @ w0.T + (32.0 / 4) * (x @ a.T @ b.T)
    with torch.no_grad(), bank.route(bank.routing([{k: 1.0}, {k: 1.0}], path=path)):
        got = layer(x)
    assert (got - want).abs().max() <= 1e-5


def test_zero_gate_is_base_model_exactly(tiny, bank):
    base = neeko_model.load("tiny", device="cpu").model
    ids = _ids(batch=3)
    with torch.no_grad():
        want = base(ids).logits
        assert torch.equal(tiny.model(ids).logits, want)  # no routing installed
    assert torch.equal(_logits(bank, tiny.model, ids, [None, {}, {0: 0.0}]), want)
    # A zero row inside a mixed batch is the base model too (same batch shape).
    mixed = _logits(bank, tiny.model, ids, [{0: 1.0}, None, {1: 0.5, 2: 0.5}])
    assert torch.equal(mixed[1], want[1])
    assert not torch.allclose(mixed[0], want[0], atol=1e-2)


@pytest.mark.parametrize("path", ["dense", "gathered"])
def test_row_in_batch_equals_row_alone(tiny, bank, path):
    ids = _ids()
    batched = _logits(bank, tiny.model, ids, GATES, path)
    for i, gate in enumerate(GATES):
        alone = _logits(bank, tiny.model, ids[i : i + 1], [gate], path)
        assert (alone[0] - batched[i]).abs().max() <= 1e-4, f"row {i}"


# -- adding blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
def test_add_blocks_leaves_other_gates_bit_identical(tiny, bank, path):
    ids = _ids()
    before = _logits(bank, tiny.model, ids, GATES, path)
    layer = next(iter(bank.layers.values()))
    capacity = layer.A.shape[0]
    new = bank.add_blocks(capacity - bank.n_blocks + 1, init="random")  # forces a resize
    assert layer.A.shape[0] > capacity
    assert new == list(range(6, capacity + 1))
    assert bank.n_blocks == capacity + 1
    assert torch.equal(_logits(bank, tiny.model, ids, GATES, path), before)
    bank.add_blocks(1)  # and once more, without a resize
    assert torch.equal(_logits(bank, tiny.model, ids, GATES, path), before)


def test_new_lora_block_starts_as_base_model(tiny, bank):
    ids = _ids(batch=2)
    (k,) = bank.add_blocks(1, init="lora")
    assert all(layer.A[k].abs().sum() > 0 for layer in bank.layers.values())
    want = _logits(bank, tiny.model, ids, [None, None])
    assert torch.equal(_logits(bank, tiny.model, ids, [{k: 1.0}, {k: 0.5}]), want)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"n": -1}, "-1"), ({"n": 0}, "0"), ({"n": 2, "init": "kaiming"}, "kaiming")],
)
def test_add_blocks_bad_arguments_raise_and_change_nothing(bank, kwargs, message):
    snap = _snapshot(bank)
    with pytest.raises(ValueError, match=message):
        bank.add_blocks(**kwargs)
    _assert_unchanged(bank, snap)


# -- training ----------------------------------------------------------------------------


@pytest.mark.parametrize("bank", [BankConfig(path=p) for p in PATHS], ids=PATHS, indirect=True)
def test_train_blocks_touches_only_that_block(tiny, bank):
    k, other = 2, 4
    before = {i: bank.get_block(i) for i in range(bank.n_blocks)}
    params = bank.train_blocks([k])
    assert len(params) == 2 * len(bank.layers)
    trainable = {id(p) for p in params}

    ids = _ids(batch=2)
    with bank.route([{k: 1.0, other: 0.5}, {other: 1.0}]):
        logits = tiny.model(ids).logits
    nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()

    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    graded = [n for n, p in tiny.model.named_parameters() if p.grad is not None]
    assert len(graded) == len(params)
    assert all(id(p) in trainable for p in tiny.model.parameters() if p.grad is not None)
    assert all(layer.A.grad is None and not layer.A.requires_grad for layer in bank.layers.values())

    torch.optim.SGD(params, lr=0.5).step()
    for i in range(bank.n_blocks):
        if i != k:
            assert _same_block(bank.get_block(i), before[i]), f"block {i} changed while training"
    bank.freeze()

    assert all(len(layer.trainable) == 0 for layer in bank.layers.values())
    after = {i: bank.get_block(i) for i in range(bank.n_blocks)}
    for i in range(bank.n_blocks):
        if i != k:
            assert _same_block(after[i], before[i]), f"block {i} changed"
    for j, name in enumerate(bank.layers):
        a, b = after[k][name]
        assert not torch.equal(a, before[k][name][0])
        assert not torch.equal(b, before[k][name][1])
        assert torch.equal(a, params[2 * j].detach())
        assert torch.equal(b, params[2 * j + 1].detach())


def _same_block(x, y) -> bool:
    return x.keys() == y.keys() and all(
        torch.equal(x[n][0], y[n][0]) and torch.equal(x[n][1], y[n][1]) for n in x
    )


# -- files -------------------------------------------------------------------------------


def test_save_read_load_round_trip(bank, tmp_path):
    k = 3
    path = bank.save_block(k, tmp_path / "sub" / "block.safetensors", meta={"name": "Neeko"})
    assert path.exists()
    assert list(path.parent.iterdir()) == [path]  # no temp file left behind
    want = bank.get_block(k)
    assert _same_block(bank.read_block(path), want)
    assert bank.n_blocks == 6

    new = bank.load_block(path)
    assert new == 6
    assert bank.n_blocks == 7
    assert _same_block(bank.get_block(new), want)
    assert bank.load_block(path, index=0) == 0
    assert _same_block(bank.get_block(0), want)

    other = LoRABank(neeko_model.load("tiny", device="cpu").model)
    assert other.load_block(path) == 0
    assert _same_block(other.get_block(0), want)


def _block_tensors(bank: LoRABank, k: int = 0) -> dict[str, torch.Tensor]:
    out = {}
    for name, (a, b) in bank.get_block(k).items():
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = a, b
    return out


def _write(path, tensors, meta=None) -> None:
    meta = {"format": "neeko-block", "version": "1", "rank": "4", "alpha": "32.0"} | (meta or {})
    save_file(tensors, str(path), metadata=meta)


def _random_bytes(bank, path):
    path.write_bytes(torch.randint(0, 256, (512,), dtype=torch.uint8).numpy().tobytes())


def _pickle(bank, path):
    torch.save(bank.get_block(0), path)


def _empty(bank, path):
    path.write_bytes(b"")


def _missing(bank, path):
    pass


def _not_neeko(bank, path):
    save_file(_block_tensors(bank), str(path))


def _wrong_shape(bank, path):
    t = _block_tensors(bank)
    t["model.layers.1.self_attn.v_proj.lora_A"] = torch.zeros(4, 65)
    _write(path, t)


def _nan(bank, path):
    t = _block_tensors(bank)
    t["model.layers.1.self_attn.q_proj.lora_B"][3, 1] = math.nan
    _write(path, t)


def _missing_module(bank, path):
    t = _block_tensors(bank)
    del t["model.layers.0.self_attn.q_proj.lora_A"], t["model.layers.0.self_attn.q_proj.lora_B"]
    _write(path, t)


def _unpaired(bank, path):
    t = _block_tensors(bank)
    del t["model.layers.0.self_attn.q_proj.lora_B"]
    _write(path, t)


def _other_alpha(bank, path):
    _write(path, _block_tensors(bank), {"alpha": "16.0"})


def _bad_alpha(bank, path):
    _write(path, _block_tensors(bank), {"alpha": "abc"})


def _other_version(bank, path):
    _write(path, _block_tensors(bank), {"version": "2"})


BAD_FILES = {
    "random bytes": (_random_bytes, "not a safetensors block file"),
    "torch pickle": (_pickle, "not a safetensors block file"),
    "empty": (_empty, "not a safetensors block file"),
    "missing": (_missing, "no such block file"),
    "no neeko metadata": (_not_neeko, "not a Neeko block"),
    "wrong shape": (_wrong_shape, r"v_proj: expected A \(4, 64\)"),
    "nan": (_nan, "NaN or inf"),
    "missing module": (_missing_module, "missing"),
    "unpaired": (_unpaired, "lacks lora_A or lora_B"),
    "other alpha": (_other_alpha, "alpha 16.0"),
    "alpha not a number": (_bad_alpha, "alpha abc"),
    "other version": (_other_version, "version '2'"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_bad_block_file_raises_and_changes_nothing(bank, tmp_path, case):
    make, message = BAD_FILES[case]
    path = tmp_path / "bad.safetensors"
    make(bank, path)
    snap = _snapshot(bank)
    for call in (bank.read_block, bank.load_block, lambda p: bank.load_block(p, index=0)):
        with pytest.raises(BlockFormatError, match=message) as exc:
            call(path)
        assert "bad.safetensors" in str(exc.value)
        _assert_unchanged(bank, snap)


def test_block_of_another_rank_is_refused(bank, tmp_path):
    rank8 = LoRABank(neeko_model.load("tiny", device="cpu").model, BankConfig(rank=8))
    rank8.add_blocks(1, init="random")
    path = rank8.save_block(0, tmp_path / "r8.safetensors")
    snap = _snapshot(bank)
    with pytest.raises(BlockFormatError, match=r"rank 8 .*this bank has rank 4"):
        bank.load_block(path)
    _assert_unchanged(bank, snap)


def test_set_block_checks_everything_before_writing(bank):
    snap = _snapshot(bank)
    good = bank.get_block(1)
    renamed = {n.replace("q_proj", "k_proj"): w for n, w in good.items()}
    with pytest.raises(BlockFormatError, match=r"missing .*q_proj.*unexpected .*k_proj"):
        bank.set_block(0, renamed)
    with pytest.raises(BlockFormatError, match="missing"):
        bank.add_block(renamed)
    last = list(good)[-1]
    bad_last = {**good, last: (good[last][0], torch.zeros(3, 4))}  # earlier modules are fine
    with pytest.raises(BlockFormatError, match=last):
        bank.set_block(0, bad_last)
    with pytest.raises(GateError, match="does not exist"):
        bank.set_block(6, good)
    _assert_unchanged(bank, snap)


# -- gates and routing -------------------------------------------------------------------

BAD_GATES = {
    "missing block": ({99: 1.0}, "block 99 does not exist"),
    "one past the end": ({6: 1.0}, "block 6 does not exist"),
    "negative index": ({-1: 1.0}, "block -1 does not exist"),
    "string index": ({"0": 1.0}, "block '0' does not exist"),
    "bool index": ({True: 1.0}, "block True does not exist"),  # True must not mean "all"
    "false index": ({False: 1.0}, "block False does not exist"),
    "nan weight": ({0: math.nan}, "weight nan for block 0 .*finite"),
    "inf weight": ({0: math.inf}, "weight inf for block 0 .*finite"),
    "none weight": ({0: None}, "weight None for block 0"),
}


@pytest.mark.parametrize("case", BAD_GATES, ids=list(BAD_GATES))
def test_bad_gate_raises_gate_error(tiny, bank, case):
    gate, message = BAD_GATES[case]
    snap = _snapshot(bank)
    with pytest.raises(GateError, match=rf"row 1: .*{message}"):
        bank.routing([{0: 1.0}, gate])
    with pytest.raises(GateError, match=message), bank.route([{0: 1.0}, gate]):
        pass
    assert bank.slot.routing is None
    _assert_unchanged(bank, snap)


def test_bad_gate_tensor_raises_gate_error(bank):
    with pytest.raises(GateError, match=r"gates must be \(batch, 6\)"):
        bank.routing(torch.zeros(2, 5))
    with pytest.raises(GateError, match="NaN or inf"):
        bank.routing(torch.tensor([[0.0, math.nan, 0, 0, 0, 0]]))


def test_routing_batch_size_must_match_input(tiny, bank):
    with pytest.raises(GateError, match="routing is for 2 rows"), bank.route([None, {0: 1.0}]):
        tiny.model(_ids(batch=3))
    assert bank.slot.routing is None


def test_nested_route_raises_and_slot_is_cleared(bank):
    with bank.route([{0: 1.0}]) as outer:
        with pytest.raises(RuntimeError, match="nested"), bank.route([{1: 1.0}]):
            pass
        assert bank.slot.routing is outer
    assert bank.slot.routing is None

    with pytest.raises(KeyError), bank.route([{0: 1.0}]):
        raise KeyError("boom")
    assert bank.slot.routing is None
    with bank.route([{2: 1.0}]) as again:  # usable again
        assert bank.slot.routing is again


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rank": 0},
        {"rank": -2},
        {"alpha": -1.0},
        {"alpha": 0.0},
        {"alpha": math.nan},
        {"path": "fast"},
        {"targets": ()},
    ],
)
def test_bank_config_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        BankConfig(**kwargs)


def test_targets_matching_nothing_raise(tiny):
    with pytest.raises(ValueError, match="no linear layer matches"):
        LoRABank(tiny.model, BankConfig(targets=("nope_proj",)))


def test_default_targets_wrap_q_and_v_only(bank):
    assert bank.module_names == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]


def test_all_linear_wraps_every_decoder_linear_but_not_lm_head(tiny):
    bank = LoRABank(tiny.model, BankConfig(targets=("all-linear",)))
    names = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(bank.layers) == 7 * tiny.model.config.num_hidden_layers
    assert {n.rsplit(".", 1)[1] for n in bank.module_names} == names
    assert type(tiny.model.lm_head) is nn.Linear
    wrapped = {id(layer.base) for layer in bank.layers.values()}
    for name, module in tiny.model.model.layers.named_modules():
        if type(module) is nn.Linear:
            assert id(module) in wrapped, name
        if isinstance(module, BlockLoRALinear):
            assert bank.layers[f"model.layers.{name}"] is module
