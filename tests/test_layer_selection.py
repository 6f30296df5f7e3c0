"""Which tensors ``extract`` takes: buffers are never layers, depth follows module paths,
``auto`` and ``param_budget`` stay shallow, regexes match whole name components, the
difference method never drops a changed tensor silently, and a zero signature warns."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest

from robustpatch.errors import SelectionError, ZeroSignatureWarning
from robustpatch.extraction import extract, open_source
from robustpatch.selection import layer_units
from rp_testutil import copy_model, perturb, trio

DEMO_WIDTHS = (16, 16, 32, 32, 64, 64)
DEMO_CONVS = (0, 3, 7, 10, 14, 17)  # SmallCNN's conv indices in ``features``


def demo_shaped(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A state dict shaped like the demo's SmallCNN: normalisation buffers, six conv +
    BatchNorm layers, a linear classifier (72,954 parameters)."""
    m = {
        "normalize.mean": np.full((1, 3, 1, 1), 0.5, np.float32),
        "normalize.std": np.full((1, 3, 1, 1), 0.25, np.float32),
    }
    c = 3
    for i, w in zip(DEMO_CONVS, DEMO_WIDTHS):
        m[f"features.{i}.weight"] = rng.normal(0, 0.1, (w, c, 3, 3)).astype(np.float32)
        bn = f"features.{i + 1}"
        m[f"{bn}.weight"] = (1 + rng.normal(0, 0.1, w)).astype(np.float32)
        m[f"{bn}.bias"] = rng.normal(0, 0.1, w).astype(np.float32)
        m[f"{bn}.running_mean"] = rng.normal(0, 0.1, w).astype(np.float32)
        m[f"{bn}.running_var"] = (1 + rng.random(w)).astype(np.float32)
        m[f"{bn}.num_batches_tracked"] = np.array(5, np.int64)
        c = w
    m["classifier.weight"] = rng.normal(0, 0.1, (10, c)).astype(np.float32)
    m["classifier.bias"] = np.zeros(10, np.float32)
    return m


def demo_trio(seed: int = 0) -> tuple[dict, dict, dict]:
    """pretrained, clean, robust of the demo's shape; every weight moves (buffers not)."""
    rng = np.random.default_rng(seed)
    pre = demo_shaped(rng)
    clean, robust = (
        {k: v if k.startswith("normalize") else moved[k] for k, v in pre.items()}
        for moved in (perturb(pre, rng, 0.01), perturb(pre, rng, 0.02))
    )
    return pre, clean, robust


def unit_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


# ---------------------------------------------------------------------------- finding 1


@pytest.mark.parametrize("module_order", [False, True])
def test_normalisation_buffers_are_not_a_layer_in_a_count(module_order):
    pre, clean, robust = demo_trio()
    s = extract(pre, clean, robust, layers=4, order=list(pre) if module_order else None)
    convs = {f"features.{i}.weight" for i in DEMO_CONVS[:4]}
    assert {n for n in s.deltas if s[n].values.ndim == 4} == convs
    assert (s.meta["layers"]["units"], s.meta["layers"]["of"]) == (4, 7)
    assert "normalize.mean" not in s and "normalize.std" not in s
    # In module order the unchanged buffers ride in the first unit, skipped, not stored.
    buffers = {"normalize.mean", "normalize.std"}
    assert buffers <= set(s.meta["skipped"]) if module_order else not s.meta["skipped"]


def test_auto_on_a_demo_shaped_model_stays_within_a_quarter_of_the_parameters():
    # The first four layers hold 23% of the parameters, five 48%: energy alone (spread
    # like the parameters here) would take six or seven of the seven layers.
    s = extract(*demo_trio(), layers="auto")
    info = s.meta["layers"]
    assert (info["mode"], info["units"], info["of"]) == ("auto", 4, 7)
    assert info["param_share"] == pytest.approx(16752 / 72954)
    assert "features.14.weight" not in s and "classifier.weight" not in s


@pytest.mark.parametrize(
    ("budget", "units"), [(0.001, 1), (0.05, 2), (0.11, 3), (0.2296, 3), (0.5, 5), (1.0, 7)]
)
def test_param_budget_takes_leading_layers_while_their_share_fits(budget, units):
    # Cumulative shares of the seven layers: 0.6%, 3.8%, 10.2%, 23.0%, 48.4%, 99.1%, 100%.
    s = extract(*demo_trio(), param_budget=budget)
    info = s.meta["layers"]
    assert (info["mode"], info["units"], info["param_budget"]) == ("budget", units, budget)
    assert info["param_share"] <= budget or units == 1


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, float("nan"), True, "0.5"])
def test_param_budget_outside_zero_one_is_refused(bad):
    with pytest.raises(SelectionError, match=r"param_budget must be a number in \(0, 1\]"):
        extract(*demo_trio(), param_budget=bad)


@pytest.mark.parametrize("layers", [2, "all", [r"features\.0"]])
def test_param_budget_with_an_explicit_selection_is_refused(layers):
    with pytest.raises(SelectionError, match="param_budget .* cannot be combined"):
        extract(*demo_trio(), layers, param_budget=0.5)


@pytest.mark.torch
def test_a_torch_modules_registered_buffers_are_never_layers():
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # A 4-D buffer whose name no rule knows: only the module can tell.
            self.register_buffer("pixel_shift", torch.zeros(1, 3, 2, 2))
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 2)

    torch.manual_seed(0)
    pre = Net()
    clean, robust = Net(), Net()
    for net, eps in ((clean, 0.01), (robust, 0.02)):
        net.load_state_dict(pre.state_dict())
        with torch.no_grad():
            for p in net.parameters():
                p.add_(eps * torch.randn_like(p))
    s = extract(pre, clean, robust, layers=1)
    assert s.meta["layers"]["of"] == 2
    assert set(s.deltas) == {"conv.weight", "conv.bias"}


# ---------------------------------------------------------------------------- finding 2

LLAMA_LAYERS = 12
LLAMA_MODULES = (
    "input_layernorm",
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "post_attention_layernorm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def llama_like(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A tiny Llama-style state dict (hidden 4, 12 blocks), in module order."""
    m = {"model.embed_tokens.weight": rng.normal(0, 0.1, (8, 4)).astype(np.float32)}
    for i in range(LLAMA_LAYERS):
        for mod in LLAMA_MODULES:
            shape = (4,) if mod.endswith("norm") else (4, 4)
            m[f"model.layers.{i}.{mod}.weight"] = rng.normal(0, 0.1, shape).astype(np.float32)
    m["model.norm.weight"] = np.ones(4, np.float32)
    m["lm_head.weight"] = rng.normal(0, 0.1, (8, 4)).astype(np.float32)
    return m


def save_sharded(m: dict, folder, tag: str):
    """Two safetensors shards as Hugging Face writes them (each sorted by name) + index."""
    from safetensors.numpy import save_file

    names = list(m)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"{tag}-{i + 1:05d}-of-00002.safetensors"
        save_file({k: m[k] for k in part}, str(folder / fname))
        weight_map.update(dict.fromkeys(part, fname))
    index = folder / f"{tag}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def block_of(name: str) -> int:
    hit = re.match(r"model\.layers\.(\d+)\.", name)
    return int(hit.group(1)) if hit else -1


def test_a_sharded_llama_file_is_read_in_depth_order(tmp_path):
    m = llama_like(np.random.default_rng(0))
    names = open_source(save_sharded(m, tmp_path, "model")).names
    assert sorted(names) == sorted(m)
    assert names[0] == "model.embed_tokens.weight"
    assert names[-2:] == ["model.norm.weight", "lm_head.weight"]
    blocks = [block_of(n) for n in names[1:-2]]
    assert blocks == sorted(blocks) and blocks[-1] == LLAMA_LAYERS - 1
    units = layer_units(names, open_source(m).spec)
    assert units[0][0] == "model.embed_tokens.weight" and units[-1] == ["lm_head.weight"]


def test_a_dict_is_read_in_depth_order_whatever_its_insertion_order():
    m = llama_like(np.random.default_rng(0))
    shuffled = {k: m[k] for k in sorted(m, reverse=True)}
    assert open_source(shuffled).names == open_source(m).names
    names = open_source(m).names
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index(
        "model.layers.10.input_layernorm.weight"
    )


# ---------------------------------------------------------------------------- finding 3

CHANGED = {f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"} | {"model.norm.weight"}


def llama_difference_pair():
    clean = llama_like(np.random.default_rng(1))
    robust = copy_model(clean)
    rng = np.random.default_rng(2)
    for k in CHANGED:
        robust[k] = (robust[k] + rng.normal(0, 0.01, robust[k].shape)).astype(np.float32)
    return clean, robust


def test_difference_auto_keeps_every_changed_tensor_and_skips_the_unchanged():
    clean, robust = llama_difference_pair()
    s = extract(None, clean, robust, method="difference")
    assert set(s.entries) == CHANGED
    assert set(s.meta["skipped"]) == set(clean) - CHANGED and "lm_head.weight" in s.meta["skipped"]
    assert s.meta["dropped"] == []
    for k in CHANGED:
        np.testing.assert_array_equal(s[k].dense(), robust[k] - clean[k])


def test_difference_with_a_selection_records_the_changed_tensors_it_left_out():
    clean, robust = llama_difference_pair()
    s = extract(None, clean, robust, r"model\.layers\.1\.self_attn", method="difference")
    assert set(s.entries) == CHANGED - {"model.norm.weight"}
    assert s.meta["dropped"] == ["model.norm.weight"]
    # 15% of the parameters end inside block 1's attention (name order: k, o, q, v).
    budget = extract(None, clean, robust, method="difference", param_budget=0.15)
    assert budget.entries and budget.meta["dropped"]
    assert set(budget.meta["dropped"]) == CHANGED - set(budget.entries)


def test_projection_skips_a_tensor_that_did_not_change():
    pre, clean, robust = trio(0)
    for m in (clean, robust):
        m["conv2.weight"] = pre["conv2.weight"].copy()
    s = extract(pre, clean, robust, layers="all")
    assert "conv2.weight" not in s and s.meta["skipped"] == ["conv2.weight"]


# ---------------------------------------------------------------------------- finding 4


def test_a_regex_matches_whole_components_anywhere_in_the_name():
    pre = llama_like(np.random.default_rng(0))
    clean = perturb(pre, np.random.default_rng(1), 0.01)
    robust = perturb(clean, np.random.default_rng(2), 0.01)

    def chosen(layers):
        return set(extract(pre, clean, robust, layers).entries)

    two = chosen(r"model\.layers\.[01]")  # not layers 10 and 11
    assert {block_of(n) for n in two} == {0, 1} and len(two) == 2 * len(LLAMA_MODULES)
    assert chosen("norm$") == {"model.norm.weight"}  # a module path, anchored at its end
    assert chosen(r"^lm_head") == {"lm_head.weight"}
    assert chosen("q_proj") == {
        f"model.layers.{i}.self_attn.q_proj.weight" for i in range(LLAMA_LAYERS)
    }
    with pytest.raises(SelectionError, match="match no tensor"):
        extract(pre, clean, robust, "layer")  # half a component


def test_a_pattern_selection_records_how_many_layer_units_it_touched():
    pre = llama_like(np.random.default_rng(0))
    clean = perturb(pre, np.random.default_rng(1), 0.01)
    robust = perturb(clean, np.random.default_rng(2), 0.01)
    units = layer_units(list(pre), lambda n: (pre[n].dtype, pre[n].shape))
    s = extract(pre, clean, robust, [r"model\.layers\.[01]", "q_proj"])
    touched = [u for u in units if set(u) & set(s.entries)]
    info = s.meta["layers"]
    assert info["mode"] == "names" and info["of"] == len(units)
    assert info["units"] == len(touched) < len(units)


@pytest.mark.parametrize("bad", [r"model\.layers\.[", ["fc", "(unclosed"], [3]])
def test_an_invalid_regex_is_our_error_naming_the_pattern(bad):
    with pytest.raises(SelectionError) as caught:
        extract(*trio(0), bad)
    assert not isinstance(caught.value, re.error)
    pattern = bad if isinstance(bad, str) else bad[-1]
    assert repr(pattern) in str(caught.value)


# ---------------------------------------------------------------------------- finding 5


def test_identical_clean_and_robust_models_are_refused():
    # their unchanged BatchNorm statistics made a no-op signature, with only a warning
    pre, clean, _ = trio(0)
    with pytest.raises(SelectionError, match="are unchanged"):
        extract(pre, clean, copy_model(clean), layers="all")
    with pytest.raises(SelectionError, match="are unchanged"):
        extract(None, clean, copy_model(clean), layers="all", method="difference")


def test_a_signature_near_zero_relative_to_the_robust_delta_warns():
    pre, clean, _ = trio(0)
    robust = copy_model(clean)
    w = robust["conv2.weight"].reshape(-1)
    w[0] = np.nextafter(w[0], np.float32(np.inf))  # one ulp: ‖rws‖ ≈ 1e-8·‖Δr‖
    with pytest.warns(ZeroSignatureWarning):
        extract(pre, clean, robust, layers="all")


def test_a_selection_of_batchnorm_statistics_alone_does_not_warn():
    # it warned "are the clean and robust checkpoints the same?": statistics have no norm
    pre, clean, robust = trio(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = extract(pre, clean, robust, layers=r"bn1\.running_(mean|var)")
    assert set(s.entries) == {"bn1.running_mean", "bn1.running_var"}


def test_a_real_signature_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(*trio(0), layers="all")
        extract(*demo_trio(), layers="all", method="difference")


def test_identical_models_without_batchnorm_leave_nothing_to_extract():
    m = llama_like(np.random.default_rng(0))
    with pytest.raises(SelectionError, match="nothing to extract"):
        extract(None, m, copy_model(m), method="difference")


def test_a_wrong_pretrained_checkpoint_is_refused_and_batchnorm_alone_is_kept():
    # every weight skipped for want of a pretrained twin: a BN-only signature, exit 0
    pre, clean, _ = trio(0)
    other = {"unrelated.weight": np.ones((3, 3), np.float32)}  # another model's checkpoint
    with pytest.raises(SelectionError, match="holds none of the"):
        extract(other, *trio(0)[1:], layers="all")
    robust = copy_model(clean)  # BatchNorm statistics alone moved: a real signature
    robust["bn1.running_mean"] = robust["bn1.running_mean"] + np.float32(0.5)
    sig = extract(pre, clean, robust, layers="all")
    assert list(sig.entries) == ["bn1.running_mean", "bn1.running_var"]


def test_names_that_do_not_split_into_layers_warn_that_the_whole_model_is_taken():
    # l0_w ... l7_w were one "layer": layers=1, a budget and auto took 100% silently
    rng = np.random.default_rng(0)
    pre = {f"l{i}_w": rng.normal(size=(16, 16)).astype(np.float32) for i in range(8)}
    clean = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in pre.items()}
    robust = {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in clean.items()}
    for options in ({"layers": 1}, {"param_budget": 0.12}):
        with pytest.warns(UserWarning, match="do not split into layers"):
            sig = extract(pre, clean, robust, **options)
        assert len(sig) == 8
    dotted = {k.replace("_", "."): v for k, v in pre.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        extract(
            dotted,
            {k.replace("_", "."): v for k, v in clean.items()},
            {k.replace("_", "."): v for k, v in robust.items()},
            layers=1,
        )
