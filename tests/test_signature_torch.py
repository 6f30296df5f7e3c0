"""Signatures on torch modules and state dicts: zero-copy CPU patching (f32, f16, bf16),
the on-device torch path, and bit-exact removal."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import robustpatch as rp  # noqa: E402
from robustpatch.errors import MismatchError  # noqa: E402
from robustpatch.extraction import extract  # noqa: E402
from robustpatch.targets import apply, remove  # noqa: E402
from robustpatch.torch_bridge import TorchTarget  # noqa: E402

pytestmark = pytest.mark.torch


class Net(torch.nn.Module):
    """conv (f32) → BatchNorm (f32) → fc1 (f16) → fc2 (bf16); casts between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 32).half()
        self.fc2 = torch.nn.Linear(32, 10).bfloat16()

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        h = torch.relu(self.fc1(h.half()).float())
        return self.fc2(h.bfloat16()).float()


def make_nets(seed: int = 0):
    """pretrained, clean, robust twins (robust differs most in the shallow layers)."""
    torch.manual_seed(seed)
    pre = Net().eval()
    nets = []
    for scale in (0.01, 0.03):
        n = Net().eval()
        n.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for name, p in n.named_parameters():
                p.add_(
                    (torch.randn_like(p.float()) * scale * (3 if "conv" in name else 1)).to(p.dtype)
                )
            n.bn.running_mean.add_(0.3)
            n.bn.running_var.mul_(1.5)
        nets.append(n)
    return pre, nets[0], nets[1]


def state_bits(m) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        assert torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k


@pytest.fixture(scope="module")
def nets():
    return make_nets()


@pytest.fixture(scope="module")
def sigs(nets):
    pre, clean, robust = nets
    a = extract(pre, clean, robust, layers="all", name="a")
    b = extract(pre.state_dict(), clean.state_dict(), robust.state_dict(), layers=2, name="b")
    return a, b.quantize(4, "affine", "group", 32)


def test_signature_dtypes_follow_the_model(sigs):
    a, _ = sigs
    assert a["conv.weight"].dtype == "F32"
    assert a["fc1.weight"].dtype == "F16"
    assert a["fc2.weight"].dtype == "BF16"
    assert a["bn.running_var"].kind == "bn"
    assert "bn.num_batches_tracked" not in a


def test_module_and_numpy_extraction_agree(nets, sigs):
    from robustpatch.torch_bridge import numpy_state

    pre, clean, robust = nets
    arrays = [numpy_state(m)[0] for m in nets]
    s = extract(*arrays, layers="all")
    for name, e in sigs[0].entries.items():
        np.testing.assert_array_equal(e.dense(), s[name].dense())


def test_remove_restores_a_module_bit_for_bit_in_place_without_copies(nets, sigs):
    clean = nets[1]
    model = Net().eval()
    model.load_state_dict(clean.state_dict())
    before = state_bits(model)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    undo = apply(model, list(sigs), [1.0, 0.5])
    after = model.state_dict()
    assert {k: v.data_ptr() for k, v in after.items()} == ptrs  # patched in place
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert undo.record_elements > 0
    remove(model, undo)
    assert_bit_identical(state_bits(model), before)


def test_remove_restores_a_state_dict_bit_for_bit(nets, sigs):
    sd = {k: v.clone() for k, v in nets[1].state_dict().items()}
    before = {k: v.clone() for k, v in sd.items()}
    undo = apply(sd, list(sigs), [-0.8, 2.0])
    remove(sd, undo)
    assert_bit_identical(sd, before)


def test_cpu_patch_equals_plain_torch(nets, sigs):
    a, _ = sigs
    clean = nets[1]
    model = Net().eval()
    model.load_state_dict(clean.state_dict())
    apply(model, a, 0.5)
    for name, e in a.deltas.items():
        w = clean.state_dict()[name]
        expect = (w.float() + 0.5 * torch.from_numpy(e.dense())).to(w.dtype)
        assert torch.equal(model.state_dict()[name], expect), name
    robust = nets[2]
    for name in ("bn.running_mean", "bn.running_var"):
        expect = 0.5 * clean.state_dict()[name].double() + 0.5 * robust.state_dict()[name].double()
        torch.testing.assert_close(model.state_dict()[name], expect.float())


def test_the_on_device_torch_path_matches_the_engine_and_removes_exactly(nets, sigs):
    """The path CUDA tensors take, exercised on CPU: same bits as the engine for dense
    deltas, and bit-exact removal from its own record."""
    a, b = sigs
    clean = nets[1]
    engine, torch_path = Net().eval(), Net().eval()
    engine.load_state_dict(clean.state_dict())
    torch_path.load_state_dict(clean.state_dict())
    before = state_bits(torch_path)
    apply(engine, a, 0.7)
    undo = apply(TorchTarget(torch_path, torch_ops=True), a, 0.7)
    assert_bit_identical(state_bits(engine), state_bits(torch_path))
    remove(torch_path, undo)
    assert_bit_identical(state_bits(torch_path), before)
    undo = apply(TorchTarget(torch_path, torch_ops=True), [a, b], [1.0, -0.5])
    remove(torch_path, undo)
    assert_bit_identical(state_bits(torch_path), before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_is_patched_on_the_device_and_restored(nets, sigs):
    model = Net().eval()
    model.load_state_dict(nets[1].state_dict())
    model = model.cuda()
    before = state_bits(model)
    undo = apply(model, list(sigs), [1.0, 0.5])
    assert all(v.device.type == "cuda" for v in model.state_dict().values())
    cpu = Net().eval()
    cpu.load_state_dict(nets[1].state_dict())
    apply(TorchTarget(cpu, torch_ops=True), sigs[0], 1.0)
    remove(model, undo)
    assert_bit_identical(state_bits(model), before)


@pytest.mark.parametrize("torch_ops", [False, True])
def test_a_patch_is_an_in_place_change_autograd_sees(torch_ops):
    """A graph that saved the weight refuses backward after apply and after remove,
    on the engine's path as on torch's own ops (it silently used the new values)."""
    from robustpatch.signature import Signature

    m = torch.nn.Linear(4, 3)
    sig = Signature.from_deltas({"weight": np.ones((3, 4), np.float32)})
    for step in ("apply", "remove"):
        x = torch.randn(2, 4, requires_grad=True)
        y = (m(x) ** 2).sum()
        target = TorchTarget(m, torch_ops=torch_ops)
        if step == "apply":
            undo = apply(target, sig)
        else:
            remove(target, undo)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            torch.autograd.grad(y, x)


def test_overlapping_torch_views_are_refused():
    """Views of one storage that share elements (a strided one included) are refused
    before anything is patched."""
    from robustpatch.errors import MismatchError
    from robustpatch.signature import Signature

    buf = torch.arange(12, dtype=torch.float32)
    before = buf.clone()
    cases = (
        {"a": buf[0:8].view(2, 4), "b": buf[4:12].view(2, 4)},
        {"a": buf[0:8].view(2, 4), "c": buf[1:12:3].view(2, 2)},  # strided: 1, 4, 7, 10
    )
    for sd in cases:
        s = Signature.from_deltas({k: np.ones(tuple(t.shape), np.float32) for k, t in sd.items()})
        with pytest.raises(MismatchError, match="share memory"):
            apply(sd, s)
        assert torch.equal(buf, before)


def test_tied_torch_weights_are_refused():
    from robustpatch.errors import MismatchError
    from robustpatch.signature import Signature

    m = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 4, bias=False)})
    m["b"] = torch.nn.Linear(4, 4, bias=False)
    m["b"].weight = m["a"].weight
    sd = {"a.weight": m["a"].weight, "b.weight": m["b"].weight}
    s = Signature.from_deltas({k: np.ones((4, 4), np.float32) for k in sd})
    before = m["a"].weight.detach().clone()
    with pytest.raises(MismatchError, match="share memory"):
        apply(sd, s)
    assert torch.equal(m["a"].weight.detach(), before)


def test_tensors_without_dense_values_are_refused_by_name(tmp_path):
    """Meta-device and sparse tensors, and keys that are not names, are clear errors
    (were torch's own RuntimeError / NotImplementedError, or an AttributeError)."""
    import robustpatch as rp
    from robustpatch.errors import FormatError, InvalidArgumentError
    from robustpatch.signature import Signature

    sig = Signature.from_deltas({"weight": np.ones((4, 4), np.float32)})
    meta = torch.nn.Linear(4, 4, device="meta")
    with pytest.raises(InvalidArgumentError, match="weight: a tensor on the meta device"):
        apply(meta, sig)
    with pytest.raises(InvalidArgumentError, match="a tensor on the meta device"):
        extract(meta, meta, meta, layers="all")
    with pytest.raises(InvalidArgumentError, match="weight: a torch.sparse_coo tensor"):
        apply({"weight": torch.eye(4).to_sparse()}, sig)
    real = {"a.weight": torch.randn(4, 4)}
    torch.save(real, tmp_path / "pre.pt")
    for name, bad, match in (
        ("keys.pt", {0: torch.randn(2)}, "key 0 is not a name"),
        ("meta.pt", {"a.weight": torch.empty(4, 4, device="meta")}, "on the meta device"),
    ):
        torch.save(bad, tmp_path / name)
        with pytest.raises(FormatError, match=f"{name}: .*{match}"):
            rp.extract(tmp_path / "pre.pt", tmp_path / "pre.pt", tmp_path / name, layers="all")


def test_remove_refuses_a_module_reloaded_since_the_patch():
    from robustpatch.errors import MismatchError
    from robustpatch.signature import Signature

    torch.manual_seed(0)
    m = torch.nn.Linear(64, 64)
    undo = apply(m, Signature.from_deltas({"weight": np.full((64, 64), 0.01, np.float32)}))
    m.load_state_dict(torch.nn.Linear(64, 64).state_dict())
    reloaded = m.weight.detach().clone()
    with pytest.raises(MismatchError, match="weight: changed since the patch"):
        remove(m, undo)
    assert torch.equal(m.weight.detach(), reloaded)


def test_a_signature_from_a_module_with_tied_weights_patches_it_back():
    """One tensor under two names (an output head tied to the embedding) is extracted
    once, under the first name, and the signature applies to the module it came from
    (it was refused as patching one storage twice)."""

    def net() -> torch.nn.Module:
        m = torch.nn.Sequential()
        m.emb = torch.nn.Embedding(10, 8)
        m.mid = torch.nn.Linear(8, 8)
        m.head = torch.nn.Linear(8, 10, bias=False)
        m.head.weight = m.emb.weight
        return m

    torch.manual_seed(0)
    pre, clean, robust = net(), net(), net()
    with torch.no_grad():
        for m, scale in ((clean, 0.01), (robust, 0.05)):
            m.load_state_dict(pre.state_dict())
            for p in m.parameters():
                p.add_(torch.randn_like(p) * scale)
    sig = extract(pre, clean, robust, layers="all")
    assert "head.weight" not in sig and sig.meta["tied"] == {"head.weight": "emb.weight"}
    before = {k: v.clone() for k, v in clean.state_dict().items()}
    undo = apply(clean, sig)
    assert torch.equal(clean.head.weight, clean.emb.weight)
    assert not torch.equal(clean.emb.weight, before["emb.weight"])
    remove(clean, undo)
    assert all(torch.equal(v, before[k]) for k, v in clean.state_dict().items())


def test_a_tensor_a_torch_checkpoint_holds_as_integers_is_named_with_why(nets, tmp_path):
    # the reason was given for numpy dicts only: torch's int tensors were dropped unnamed
    pre, clean, robust = nets
    state = {k: v.clone() for k, v in robust.state_dict().items()}
    state["fc1.bias"] = torch.arange(state["fc1.bias"].numel())
    torch.save(state, tmp_path / "robust.pt")
    for source in (state, tmp_path / "robust.pt"):
        with pytest.raises(MismatchError, match=r"robust model holds it as int64\)"):
            extract(pre, clean, source, layers="all")


def test_a_state_dict_mixing_torch_tensors_and_numpy_arrays_is_refused():
    # the first value chose the kind: an AttributeError traceback on the other
    sig = rp.Signature.from_deltas({"b": np.ones(4, np.float32)})
    mixed = {"a": torch.ones(4), "b": np.ones(4, np.float32)}
    with pytest.raises(rp.InvalidArgumentError, match="mixes torch tensors and numpy arrays"):
        apply(mixed, sig)
    assert (mixed["b"] == 1).all()


def test_torch_deltas_and_alphas_are_taken_as_a_model_is():
    # bf16 or requires_grad deltas crashed from_deltas and detect with torch's own errors;
    # alphas=torch.tensor(0.5) raised "iteration over a 0-d tensor"
    grad = torch.full((2, 2), 0.5, dtype=torch.bfloat16, requires_grad=True) * 1
    sig = rp.Signature.from_deltas({"w": grad}, name="t")
    assert sig["w"].dtype == "BF16" and (sig["w"].dense() == 0.5).all()
    assert rp.detect({"w": grad}, {"t": sig})[0][0] == "t"
    model = {"w": torch.zeros(2, 2, dtype=torch.bfloat16)}
    rp.apply(model, [sig, sig], alphas=torch.tensor([1.0, 1.0]))
    rp.apply(model, sig, alphas=torch.tensor(2.0))
    assert (model["w"] == 2).all()
