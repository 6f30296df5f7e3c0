"""One normaliser per kind of input (robustpatch.validate), used where the input enters:
public functions and CLI flags refuse the same values with the same one-line reason."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from robustpatch import validate
from robustpatch.cli import main
from robustpatch.errors import InvalidArgumentError, NonFiniteError
from robustpatch.signature import Signature
from robustpatch.targets import apply
from rp_testutil import same_bits

F32_MAX = float(np.finfo(np.float32).max)


def test_alphas_broadcast_one_value_and_keep_a_list():
    assert validate.alphas(3, 0.5) == [0.5, 0.5, 0.5]
    assert validate.alphas(3, [2]) == [2.0, 2.0, 2.0]
    assert validate.alphas(2, np.array([1, -1.5], np.float32)) == [1.0, -1.5]
    assert validate.alphas(2, (np.float64(0.25), 3)) == [0.25, 3.0]
    assert all(type(a) is float for a in validate.alphas(2, [np.int64(1), np.float32(2)]))


@pytest.mark.parametrize(
    ("n", "value", "error", "message"),
    [
        (2, [1, 2, 3], InvalidArgumentError, "2 signatures but 3 alpha values"),
        (1, math.nan, NonFiniteError, "alpha nan is not finite"),
        (2, [1, math.inf], NonFiniteError, "alpha #2 inf is not finite"),
        (1, 1e39, InvalidArgumentError, "outside the float32 range"),
        (1, -2 * F32_MAX, InvalidArgumentError, "outside the float32 range"),
        (1, True, InvalidArgumentError, "alpha must be a real number, got True"),
        (1, "1.0", InvalidArgumentError, "alpha must be a real number, got '1.0'"),
        (2, [1, None], InvalidArgumentError, "alpha #2 must be a real number, got None"),
        (1, 1 + 2j, InvalidArgumentError, "must be a real number"),
    ],
)
def test_bad_alphas_are_named(n, value, error, message):
    with pytest.raises(error) as e:
        validate.alphas(n, value)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_largest_float32_alpha_is_accepted():
    assert validate.alpha(F32_MAX) == F32_MAX


@pytest.mark.parametrize("good", [1, 8, np.int8(3), np.uint64(8)])
def test_bits_from_1_to_8(good):
    assert validate.bits(good) == int(good)


@pytest.mark.parametrize("bad", [0, 9, 99, -1, 2**70, True, 4.0, "4", None, np.float32(4)])
def test_bits_outside_1_to_8_or_not_an_integer_are_refused(bad):
    with pytest.raises(InvalidArgumentError, match="expected bits from 1 to 8"):
        validate.bits(bad)


@pytest.mark.parametrize("bad", [0, -4, 1.5, True, "128"])
def test_group_must_be_a_positive_integer(bad):
    with pytest.raises(InvalidArgumentError, match="positive integer group size"):
        validate.group(bad)
    assert validate.group(2**40) == 2**40


def test_scheme_and_granularity_name_their_choices():
    assert validate.scheme("tanh") == "tanh" and validate.granularity("channel") == "channel"
    with pytest.raises(InvalidArgumentError, match="unknown scheme 'cubic'; expected one of aff"):
        validate.scheme("cubic")
    with pytest.raises(InvalidArgumentError, match="unknown granularity 'rows'"):
        validate.granularity("rows")
    with pytest.raises(InvalidArgumentError, match="unknown scheme 4"):
        validate.scheme(4)


def test_paths_are_strings_or_pathlike_and_usable():
    assert validate.path(Path("a") / "b.rws") == Path("a/b.rws")
    for bad, why in [(None, "str or os.PathLike"), (3, "str or os.PathLike"), ("", "usable")]:
        with pytest.raises(InvalidArgumentError, match=why):
            validate.path(bad)
    with pytest.raises(InvalidArgumentError, match="usable"):
        validate.path("a\0b")


def test_a_long_bad_value_is_shortened_in_the_message():
    with pytest.raises(InvalidArgumentError) as e:
        validate.scheme("x" * 1000)
    assert len(str(e.value)) < 150


# ---------------------------------------------------------------------------- at the edges


def _kinds() -> dict[str, object]:
    rng = np.random.default_rng(0)
    delta = {"w": rng.normal(0, 1, 64).astype(np.float32)}
    bn = {"bn.running_mean": np.ones(4, np.float32)}
    dense = Signature.from_deltas(delta, bn=bn, name="dense")
    return {
        "only_bn": Signature.from_deltas({}, bn=bn, name="bn"),
        "dense": dense,
        "quantized": dense.quantize(4),
        "empty": Signature([], name="empty"),
        "empty_tensor": Signature.from_deltas({"z": np.zeros(0, np.float32)}),
        "scaled": 0.5 * dense.quantize(4),
        "sum": dense + dense.quantize(4),
    }


@pytest.mark.parametrize("kind", list(_kinds()))
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 99}, "expected bits from 1 to 8"),
        ({"bits": 0}, "expected bits from 1 to 8"),
        ({"bits": 4.0}, "expected bits from 1 to 8"),
        ({"scheme": "cubic"}, "unknown scheme"),
        ({"granularity": "rows"}, "unknown granularity"),
        ({"group": 0}, "positive integer group size"),
    ],
)
def test_quantize_refuses_bad_arguments_for_every_kind_of_signature(kind, kwargs, message):
    sig = _kinds()[kind]
    with pytest.raises(InvalidArgumentError, match=message):
        sig.quantize(**kwargs)


def test_quantize_records_only_checked_values():
    q = _kinds()["only_bn"].quantize(np.int64(3), group=np.int32(16))
    assert q.meta["quantization"] == {
        "bits": 3,
        "scheme": "affine",
        "granularity": "group",
        "group": 16,
    }
    assert all(type(v) in (int, str) for v in q.meta["quantization"].values())


def test_apply_refuses_a_bad_alpha_before_touching_the_model():
    sig = _kinds()["dense"]
    model = {"w": np.zeros(64, np.float32), "bn.running_mean": np.zeros(4, np.float32)}
    before = {k: v.copy() for k, v in model.items()}
    for bad, error in [(math.nan, NonFiniteError), (1e39, InvalidArgumentError)]:
        with pytest.raises(error):
            apply(model, sig, bad)
    with pytest.raises(InvalidArgumentError, match="1 signatures but 2 alpha values"):
        apply(model, sig, [1.0, 2.0])
    with pytest.raises(InvalidArgumentError, match="expected a Signature or a path"):
        apply(model, [sig, 3])
    assert same_bits(model, before)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quantize", "s.rws", "-o", "q.rws", "--bits", "99"], "expected bits from 1 to 8"),
        (["quantize", "s.rws", "-o", "q.rws", "--bits", "four"], "expected bits from 1 to 8"),
        (["quantize", "s.rws", "-o", "q.rws", "--group", "-1"], "positive integer group size"),
        (["apply", "m", "s.rws", "-o", "p", "--alpha", "nan"], "alpha nan is not finite"),
        (["apply", "m", "s.rws", "-o", "p", "--alpha", "1e39"], "outside the float32 range"),
        (["combine", "s.rws", "-o", "c.rws", "--coef", "inf"], "coefficient inf is not finite"),
    ],
)
def test_cli_flags_use_the_same_rules(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_numpy_booleans_and_0d_alphas_are_taken_as_their_values():
    # force=np.True_ was "must be true or false"; np.array(2.0) "not a real number"
    import numpy as np

    import robustpatch as rp
    from robustpatch.options import FILE_OPTIONS, PatchOptions

    opts = PatchOptions.of({"force": np.True_}, "apply_file", FILE_OPTIONS)
    assert opts.force is True
    model = {"w": np.zeros(4, np.float32)}
    rp.apply(model, rp.Signature.from_deltas({"w": np.ones(4, np.float32)}), np.array(2.0))
    assert (model["w"] == 2).all()


@pytest.mark.parametrize(
    ("pattern", "chosen"),
    [("(?i)(?s)CONV", ["conv.w"]), ("(?x) layers\\.1  # the first block", ["layers.1.w"])],
)
def test_layer_regexes_with_several_flags_or_a_verbose_comment_compile(pattern, chosen):
    # only the first flag group was kept in front; a comment swallowed the wrapping
    from robustpatch.selection import compile_layer_pattern

    names = ["layers.1.w", "layers.10.w", "conv.w"]
    assert [n for n in names if compile_layer_pattern(pattern).search(n)] == chosen
