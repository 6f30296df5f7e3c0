"""Hostile and malformed files (issue 8): every case is refused with a clear, typed error
by ``Signature.load``, by ``apply_file`` (in each role the file can play) and by the CLI
(``inspect`` and ``apply``: one line ``robustpatch: error: ...``, exit code 1); no Rust
panic reaches Python; the inputs keep their sha256; nothing appears at the destination
and no temporary file is left anywhere. Zero-length tensors are valid and must work.

Cases already covered by test_files.py / test_signature.py for ``apply_file`` alone
(truncation, bad offsets, NaN scales, unknown version, tampering) are repeated here only
as rows of the matrix, which runs them through every entry point. Also: nothing in the
package loads pickle, and ``.pt`` checkpoints are read with ``weights_only=True``.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import robustpatch
from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
from robustpatch._format.undo import UNDO_VERSION, record_digest
from robustpatch.cli import main
from robustpatch.errors import FormatError, NonFiniteError
from robustpatch.extraction import extract
from robustpatch.files import APPLIED_KEY, UNDO_KEY, apply_file, remove_file
from robustpatch.signature import Signature, content_hash
from robustpatch.targets import apply
from rp_testutil import copy_model, listing, same_bits, sha, trio

TYPED = (ValueError, TypeError, OSError)  # FormatError, NonFiniteError are ValueErrors
MAX_HEADER = 100_000_000  # the engine's header limit (safetensors' own)
SIG_KEY = "robustpatch"


# ---------------------------------------------------------------------------- raw files


def raw(header: str | bytes | dict, data: bytes = b"", declared: int | None = None) -> bytes:
    """A safetensors file from its parts: 8-byte length (or ``declared``), header, data."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    n = len(header) if declared is None else declared
    return struct.pack("<Q", n) + header + data


def t(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


@dataclass
class Base:
    """The valid files every case starts from (module-scoped, never modified)."""

    dir: Path
    model: Path
    sig: Path
    clean: dict
    sig_meta: dict
    sig_tensors: dict


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Base:
    d = tmp_path_factory.mktemp("base")
    pre, clean, robust = trio(0)
    write_tensors(d / "model.safetensors", clean, {"format": "pt"})
    sig = extract(pre, clean, robust, layers="all", name="fog").quantize(4)
    sig.save(d / "fog.rws")
    header, tensors = read_tensors(d / "fog.rws")
    meta = json.loads(header.metadata[SIG_KEY])
    return Base(d, d / "model.safetensors", d / "fog.rws", clean, meta, tensors)


def sig_variant(
    b: Base,
    meta_fn: Callable[[dict], object] | None = None,
    tensors_fn: Callable[[dict], object] | None = None,
    rehash: bool = True,
    raw_meta: str | None = None,
) -> Callable[[Path], None]:
    """A builder for a signature file derived from the base one: ``meta_fn`` and
    ``tensors_fn`` mutate copies in place; ``rehash`` recomputes the content hash so
    that the check under test (not the hash) is what refuses the file."""

    def build(path: Path) -> None:
        meta = copy.deepcopy(b.sig_meta)
        tensors = {k: v.copy() for k, v in b.sig_tensors.items()}
        if tensors_fn:
            tensors_fn(tensors)
        if meta_fn:
            meta_fn(meta)
        if rehash and isinstance(meta.get("entries"), list):
            meta["content_hash"] = content_hash(meta["entries"], tensors)
        text = raw_meta if raw_meta is not None else json.dumps(meta)
        labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
        write_tensors(path, tensors, {SIG_KEY: text}, labels)

    return build


def _set_path(meta: dict, path: str, value: object) -> None:
    """Set ``meta[a][b]...`` for ``path`` "a.b...", a digit indexing a list; a missing
    object on the way is made."""
    *parents, last = path.split(".")
    node = meta
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    node[int(last) if last.isdigit() else last] = value


def entry(meta: dict, name: str) -> dict:
    return next(e for e in meta["entries"] if e["name"] == name)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# ---------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    role: str  # "container": any safetensors file (model or signature); "signature"; "model"
    build: Callable[[Base, Path], None]
    exc: type[BaseException]
    match: str


def _bytes(data_fn: Callable[[Base], bytes]) -> Callable[[Base, Path], None]:
    return lambda b, p: p.write_bytes(data_fn(b))


def _sparse_over_limit(b: Base, p: Path) -> None:
    """A 110 MB sparse file declaring a header just over the limit: the file is big
    enough, so only the limit can refuse it (before reading or allocating it)."""
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER + 8))
        f.truncate(MAX_HEADER + (10 << 20))


def _metadata_over_limit(b: Base, p: Path) -> None:
    """A real, well-formed header over the limit: a 100 MB robustpatch metadata string."""
    head = raw({"__metadata__": {SIG_KEY: "x" * (MAX_HEADER + 8)}})
    p.write_bytes(head)


def _flip_codes_byte(b: Base) -> bytes:
    data = bytearray(b.sig.read_bytes())
    h = read_header(b.sig)
    codes = h.by_name()["conv2.weight.codes"]
    data[h.data_start + codes.begin + 5] ^= 0x10
    return bytes(data)


def _truncated(b: Base, keep: Callable[[int], int]) -> bytes:
    data = b.model.read_bytes()
    return data[: keep(len(data))]


def _model_with_applied(b: Base, applied: str) -> Callable[[Path], None]:
    def build(p: Path) -> None:
        write_tensors(p, b.clean, {"format": "pt", APPLIED_KEY: applied})

    return build


def _cases() -> list[Case]:
    C = Case
    F = FormatError
    two = t("F32", [2], 0, 8)
    cases = [
        # -- container: the safetensors layer (engine parser) -----------------------------
        C("empty_file", "container", _bytes(lambda b: b""), F, "too short for a header"),
        C("short_prefix", "container", _bytes(lambda b: b"\x10\0\0"), F, "too short"),
        C(
            "header_len_past_eof",
            "container",
            _bytes(lambda b: raw({"a": two}, bytes(8), declared=4096)),
            F,
            "runs past the end",
        ),
        C("header_len_over_100mb", "container", _sparse_over_limit, F, "exceeds the"),
        C(
            "header_len_u64_max",
            "container",
            _bytes(lambda b: raw("{}", declared=2**64 - 1)),
            F,
            "exceeds the",
        ),
        C("metadata_over_100mb", "container", _metadata_over_limit, F, "exceeds the"),
        C(
            "non_utf8_header",
            "container",
            _bytes(lambda b: raw(b'{"a\xff\xfe":' + json.dumps(two).encode() + b"}", bytes(8))),
            F,
            "not UTF-8",
        ),
        C("invalid_json", "container", _bytes(lambda b: raw('{"a": {"dtype"')), F, "not a JSON"),
        C("non_object_json", "container", _bytes(lambda b: raw("[1, 2, 3]")), F, "not a JSON obj"),
        C(
            "header_json_too_deep",
            "container",
            _bytes(lambda b: raw('{"__metadata__": {"k": ' + nested(100_000) + "}}")),
            F,
            "recursion limit",
        ),
        C(
            "duplicate_names",
            "container",
            _bytes(lambda b: raw(f'{{"a": {json.dumps(two)}, "a": {json.dumps(two)}}}', bytes(8))),
            F,
            "duplicate entry",
        ),
        C(
            "overlapping_offsets",
            "container",
            _bytes(
                lambda b: raw({"a": t("F32", [4], 0, 16), "b": t("F32", [2], 8, 16)}, bytes(16))
            ),
            F,
            "overlap",
        ),
        C(
            "offsets_out_of_bounds",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [2], 1 << 40, (1 << 40) + 8)}, bytes(8))),
            F,
            "outside a data buffer",
        ),
        C(
            "offsets_reversed",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [0], 8, 0)}, bytes(8))),
            F,
            "outside a data buffer",
        ),
        C(
            "size_not_dtype_times_shape",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [3], 0, 8)}, bytes(8))),
            F,
            "needs 12 bytes",
        ),
        C(
            "shape_product_overflows_u64",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [1 << 32, 1 << 32, 16], 0, 8)}, bytes(8))),
            F,
            "overflows",
        ),
        C(
            "more_dimensions_than_numpy_has",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [1] * 65, 0, 4)}, bytes(4))),
            F,
            "65 dimensions",
        ),
        C(
            "negative_dimension",
            "container",
            _bytes(lambda b: raw({"a": t("F32", [-2], 0, 8)}, bytes(8))),
            F,
            "non-integer",
        ),
        C(
            "unknown_dtype",
            "container",
            _bytes(lambda b: raw({"a": t("Q4", [2], 0, 8)}, bytes(8))),
            F,
            "unknown dtype",
        ),
        C(
            "metadata_value_not_a_string",
            "container",
            _bytes(lambda b: raw({"__metadata__": {SIG_KEY: {"format_version": 1}}})),
            F,
            "not a string",
        ),
        C(
            "truncated_data",
            "container",
            _bytes(lambda b: _truncated(b, lambda n: n - 100)),
            F,
            "outside a data buffer",
        ),
        C(
            "truncated_in_header",
            "container",
            _bytes(lambda b: _truncated(b, lambda n: 40)),
            F,
            "runs past the end",
        ),
        # -- signature: the robustpatch metadata and tensors ----------------------------
        C(
            "nan_scale",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts["conv2.weight.scale"].__setitem__(3, np.nan)
            )(p),
            NonFiniteError,
            "conv2.weight: scale holds NaN",
        ),
        C(
            "inf_offset",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts["fc.weight.offset"].__setitem__(0, -np.inf)
            )(p),
            NonFiniteError,
            "fc.weight: offset holds NaN or Inf",
        ),
        C(
            "negative_scale",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts["conv2.weight.scale"].__setitem__(2, -0.5)
            )(p),
            FormatError,
            "group 2 has a negative scale",
        ),
        C(
            "scale_decodes_past_float32",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts["conv2.weight.scale"].__setitem__(1, 3e37)
            )(p),
            FormatError,
            "group 1 .* decodes past the float32 range",
        ),
        C(
            "codes_two_dimensional",
            "signature",
            lambda b, p: sig_variant(
                b,
                tensors_fn=lambda ts: ts.update(
                    {"fc.weight.codes": ts["fc.weight.codes"].reshape(2, -1)}
                ),
            )(p),
            FormatError,
            r"'fc.weight.codes' has shape \[2, 320\], not 1-D",
        ),
        *(
            C(
                f"metadata_{key}_{kind}",
                "signature",
                lambda b, p, key=key, value=value: sig_variant(
                    b, meta_fn=lambda m: _set_path(m, key, value)
                )(p),
                F,
                match,
            )
            for key, kind, value, match in (
                ("entries.1", "int", 5, "malformed entry 5"),
                ("entries.0.stats", "list", [1], "has stats that are not a JSON object"),
                ("fingerprints", "str", "x", "'fingerprints' in the metadata is not a JSON"),
                ("fingerprints.base", "list", [1], "fingerprint 'base' is not a string"),
                ("source", "list", [1], "'source' in the metadata is not a JSON object"),
                ("source.model_nbytes", "str", "abc", "model_nbytes 'abc' is not a byte count"),
                ("skipped", "int", 7, "'skipped' in the metadata is not a list"),
            )
        ),
        C(
            "codes_wrong_length",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts.update({"fc.weight.codes": ts["fc.weight.codes"][:-1]})
            )(p),
            FormatError,
            "'fc.weight.codes' has 639 elements, expected 640",
        ),
        C(
            "codes_wrong_dtype",
            "signature",
            lambda b, p: sig_variant(
                b,
                tensors_fn=lambda ts: ts.update(
                    {"fc.weight.codes": ts["fc.weight.codes"].view(np.int8)}
                ),
            )(p),
            FormatError,
            "'fc.weight.codes' has dtype int8, expected uint8",
        ),
        C(
            "scale_count_wrong",
            "signature",
            lambda b, p: sig_variant(
                b,
                tensors_fn=lambda ts: ts.update(
                    {"conv2.weight.scale": ts["conv2.weight.scale"][:-1]}
                ),
            )(p),
            FormatError,
            "'conv2.weight.scale' has 35 elements, expected 36",
        ),
        C(
            "missing_tensor",
            "signature",
            lambda b, p: sig_variant(b, tensors_fn=lambda ts: ts.pop("conv2.weight.offset"))(p),
            FormatError,
            "'conv2.weight.offset' is missing",
        ),
        C(
            "unexpected_tensor",
            "signature",
            lambda b, p: sig_variant(
                b, tensors_fn=lambda ts: ts.update({"payload": np.zeros(4, np.float32)})
            )(p),
            FormatError,
            r"unexpected tensors \['payload'\]",
        ),
        C(
            "content_hash_mismatch_data",
            "signature",
            _bytes(_flip_codes_byte),
            FormatError,
            "content hash mismatch",
        ),
        C(
            "content_hash_mismatch_metadata",
            "signature",
            lambda b, p: sig_variant(
                b, meta_fn=lambda m: entry(m, "fc.bias").update(dtype="F16"), rehash=False
            )(p),
            FormatError,
            "content hash mismatch",
        ),
        C(
            "unknown_format_version",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: m.update(format_version=99))(p),
            FormatError,
            "version 99 is newer than this robustpatch supports",
        ),
        C(
            "format_version_missing",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: m.pop("format_version"))(p),
            FormatError,
            "missing or invalid format_version",
        ),
        C(
            "format_version_not_int",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: m.update(format_version="1"))(p),
            FormatError,
            "missing or invalid format_version",
        ),
        C(
            "metadata_not_json",
            "signature",
            lambda b, p: sig_variant(b, raw_meta='{"format_version": 1, "entries": [')(p),
            FormatError,
            "robustpatch metadata is not valid JSON",
        ),
        C(
            "metadata_not_an_object",
            "signature",
            lambda b, p: sig_variant(b, raw_meta="[1, 2, 3]")(p),
            FormatError,
            "robustpatch metadata is not a JSON object",
        ),
        C(
            "metadata_json_too_deep",  # json.loads itself gives up (RecursionError)
            "signature",
            lambda b, p: sig_variant(b, raw_meta=f'{{"format_version": 1, "x": {nested(50_000)}}}')(
                p
            ),
            FormatError,
            "robustpatch metadata nests deeper than 64 levels",
        ),
        C(
            "metadata_nested_500",  # parses, but would overflow deepcopy/json.dumps later
            "signature",
            lambda b, p: sig_variant(
                b, meta_fn=lambda m: m.update(provenance=json.loads(nested(500)))
            )(p),
            FormatError,
            "nests deeper than 64 levels",
        ),
        C(
            "entries_not_a_list",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: m.update(entries={"a": 1}))(p),
            FormatError,
            "not a signature",
        ),
        C(
            "bits_out_of_range",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: entry(m, "fc.weight").update(bits=9))(p),
            FormatError,
            "'fc.weight' has bad bits/scheme",
        ),
        C(
            "unknown_scheme",
            "signature",
            lambda b, p: sig_variant(
                b, meta_fn=lambda m: entry(m, "fc.weight").update(scheme="rot13")
            )(p),
            FormatError,
            "bad bits/scheme",
        ),
        C(
            "group_len_not_a_divisor",
            "signature",
            lambda b, p: sig_variant(
                b, meta_fn=lambda m: entry(m, "conv2.weight").update(group_len=7)
            )(p),
            FormatError,
            "'conv2.weight' has a bad group length 7",
        ),
        C(
            "entry_shape_product_overflows_u64",
            "signature",
            lambda b, p: sig_variant(
                b,
                meta_fn=lambda m: entry(m, "conv2.weight").update(
                    shape=[1 << 32, 1 << 32, 16], group_len=128
                ),
            )(p),
            FormatError,
            "'conv2.weight.codes' has 2304 elements, expected 147573952589676412928",
        ),
        C(
            "entry_negative_dimension",
            "signature",
            lambda b, p: sig_variant(b, meta_fn=lambda m: entry(m, "fc.bias").update(shape=[-10]))(
                p
            ),
            FormatError,
            "'fc.bias' has a bad kind, shape or dtype",
        ),
        C(
            "bn_weight_nan",
            "signature",
            lambda b, p: sig_variant(
                b, meta_fn=lambda m: entry(m, "bn1.running_var").update(weight=math.nan)
            )(p),
            FormatError,
            "'bn1.running_var' has a bad weight nan",
        ),
        C(
            "bn_replacement_inf",
            "signature",
            lambda b, p: sig_variant(
                b,
                tensors_fn=lambda ts: ts["bn1.running_mean.replace"].__setitem__(4, np.inf),
            )(p),
            NonFiniteError,
            "bn1.running_mean: BatchNorm replacement holds NaN or Inf at flat index 4",
        ),
        # -- model: what a patched model records about itself -------------------------------
        C(
            "applied_metadata_too_deep",
            "model",
            lambda b, p: _model_with_applied(b, nested(100_000))(p),
            FormatError,
            "robustpatch.applied metadata nests deeper",
        ),
        C(
            "applied_metadata_not_a_list",
            "model",
            lambda b, p: _model_with_applied(b, '{"name": "x"}')(p),
            FormatError,
            "robustpatch.applied metadata is not a list",
        ),
    ]
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids))
    return cases


CASES = _cases()
# The model-role cases are valid safetensors files without signature metadata.
NOT_A_SIGNATURE = "not a robustpatch signature"


@pytest.fixture(scope="module")
def built(base, tmp_path_factory):
    """case id → the hostile file (built once, on first use)."""
    folder = tmp_path_factory.mktemp("cases")
    cache: dict[str, Path] = {}

    def get(case: Case) -> Path:
        if case.id not in cache:
            path = folder / f"{case.id}.safetensors"
            case.build(base, path)
            cache[case.id] = path
        return cache[case.id]

    return get


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def refused(fn: Callable[[], object], exc: type[BaseException], match: str) -> BaseException:
    """``fn()`` raises ``exc`` matching ``match``; never a Rust panic, always typed."""
    with pytest.raises(BaseException) as info:
        fn()
    e = info.value
    assert type(e).__name__ != "PanicException", f"a Rust panic reached Python: {e}"
    assert isinstance(e, TYPED), f"untyped error {type(e).__name__}: {e}"
    assert isinstance(e, exc), f"expected {exc.__name__}, got {type(e).__name__}: {e}"
    assert re.search(match, str(e)), f"{match!r} not in {e}"
    return e


class Untouched:
    """The files given keep their sha256; the folders given keep their file names."""

    def __init__(self, files: list[Path], folders: list[Path]) -> None:
        self.files, self.folders = files, folders

    def __enter__(self) -> Untouched:
        self.before = [sha(p) for p in self.files]
        self.names = [_names(d) for d in self.folders]
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            assert [sha(p) for p in self.files] == self.before, "an input changed"
            assert [_names(d) for d in self.folders] == self.names, "a file appeared"


def _expect_load(case: Case) -> tuple[type[BaseException], str]:
    if case.role == "model":
        return FormatError, NOT_A_SIGNATURE
    return case.exc, case.match


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_signature_load_refuses(case, base, built):
    path = built(case)
    exc, match = _expect_load(case)
    size = path.stat().st_size
    with Untouched([path], [path.parent]):
        tracemalloc.start()
        try:
            refused(lambda: Signature.load(path), exc, match)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    # Python-side allocations (numpy included) never exceed the file by more than a
    # fixed slack, whatever sizes the header claims.
    assert peak <= size + (4 << 20), f"allocated {peak} bytes for a {size}-byte file"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_apply_file_refuses(case, base, built, tmp_path):
    path = built(case)
    out = tmp_path / "out"
    out.mkdir()
    calls = []
    if case.role in ("container", "model"):  # the hostile file as the model
        calls.append(lambda: apply_file(path, [base.sig], 1.0, out / "p.safetensors"))
    if case.role in ("container", "signature"):  # ... and as a signature
        calls.append(lambda: apply_file(base.model, [path], 1.0, out / "p.safetensors"))
    with Untouched([path, base.model, base.sig], [path.parent, base.dir, out]):
        for call in calls:
            refused(call, case.exc, case.match)
    assert listing(out) == {}


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - anything escaping main is the failure
        pytest.fail(f"{type(e).__name__} escaped the CLI: {e}")
    out, err = capsys.readouterr()
    return code, err


def _one_line_error(code: int, err: str, match: str) -> None:
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustpatch: error: "), err
    assert "Traceback" not in err
    assert re.search(match, lines[0]), f"{match!r} not in {lines[0]}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_inspect_and_apply_refuse(case, base, built, tmp_path, capsys):
    path = built(case)
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "p.safetensors"
    argvs = [["inspect", path], ["inspect", path, "--json"]]
    if case.role in ("container", "model"):
        argvs.append(["-q", "apply", path, base.sig, "-o", dest])
    if case.role in ("container", "signature"):
        argvs.append(["apply", base.model, path, "-o", dest])
    with Untouched([path, base.model, base.sig], [path.parent, base.dir, out]):
        for argv in argvs:
            code, err = _cli(capsys, *argv)
            _one_line_error(code, err, case.match)
    assert listing(out) == {}


@pytest.mark.parametrize(
    "case_id", ["header_len_over_100mb", "duplicate_names", "nan_scale", "metadata_json_too_deep"]
)
def test_the_console_script_exits_1_with_one_line(case_id, base, built, tmp_path):
    """The same through a real process (the installed ``robustpatch`` entry point)."""
    case = next(c for c in CASES if c.id == case_id)
    path = built(case)
    dest = tmp_path / "p.safetensors"
    model, sig = (path, base.sig) if case.role == "container" else (base.model, path)
    code = "import sys; from robustpatch.cli import main; sys.exit(main())"
    with Untouched([path, base.model, base.sig], [path.parent, tmp_path]):
        for argv in (["inspect", path], ["apply", model, sig, "-o", dest]):
            proc = subprocess.run(
                [sys.executable, "-c", code, *map(str, argv)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 1, proc.stderr
            _one_line_error(proc.returncode, proc.stderr, case.match)


def test_the_suite_covers_at_least_20_distinct_refusals():
    assert len(CASES) >= 20
    assert len({c.id for c in CASES}) == len(CASES)


# ---------------------------------------------------------------------------- undo records


@pytest.fixture()
def patched(base, tmp_path):
    out = tmp_path / "p.safetensors"
    apply_file(base.model, [base.sig], 1.0, out)
    return out


def _rewrite_undo(path: Path, meta_fn=None, tensors_fn=None, raw_meta=None) -> None:
    header, tensors = read_tensors(path)
    meta = json.loads(header.metadata[UNDO_KEY])
    if meta_fn:
        meta_fn(meta)
    if tensors_fn:
        tensors_fn(tensors)
    meta["record_digest"] = record_digest(meta, tensors)  # reach the checks past it
    labels = {k: "U16" for k, a in tensors.items() if a.dtype == np.uint16}
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    write_tensors(path, tensors, {UNDO_KEY: text}, labels)


def _bad_positions(ts: dict) -> None:
    key = next(k for k in ts if k.endswith("/positions") and ts[k].size)
    ts[key] = ts[key].copy()
    ts[key][0] = 10**9


@pytest.mark.parametrize(
    ("kind", "mutate", "exc", "match"),
    [
        ("not_json", {"raw_meta": "{"}, FormatError, "undo metadata is not valid JSON"),
        ("too_deep", {"raw_meta": nested(100_000)}, FormatError, "undo metadata nests deeper"),
        (
            "newer_version",
            {"meta_fn": lambda m: m.update(format_version=UNDO_VERSION + 1)},
            FormatError,
            f"undo format version {UNDO_VERSION + 1} is newer",
        ),
        ("position_out_of_range", {"tensors_fn": _bad_positions}, ValueError, "outside a tensor"),
    ],
)
def test_a_hostile_undo_record_is_refused_by_remove(
    patched, tmp_path, capsys, kind, mutate, exc, match
):
    undo = patched.with_name(patched.name + ".rpundo")
    _rewrite_undo(undo, **mutate)
    out = tmp_path / "restored"
    out.mkdir()
    with Untouched([patched, undo], [tmp_path, out]):
        refused(lambda: remove_file(patched, out / "r.safetensors"), exc, match)
        code, err = _cli(capsys, "remove", patched, "-o", out / "r.safetensors")
        _one_line_error(code, err, match)
        if kind != "position_out_of_range":  # inspect reads only the metadata
            code, err = _cli(capsys, "inspect", undo)
            _one_line_error(code, err, match)
    assert listing(out) == {}


# ---------------------------------------------------------------------------- valid edge cases


def test_zero_length_tensors_load_patch_inspect_and_restore(tmp_path, capsys):
    """Zero-element tensors are valid everywhere: in a model (before, between and after
    other tensors, and as the last bytes of the file) and as signature entries."""
    rng = np.random.default_rng(1)
    model = {
        "empty.first": np.zeros((0,), np.float32),
        "w": rng.normal(0, 1, (8, 16)).astype(np.float32),
        "empty.middle": np.zeros((0, 3), np.float16),
        "v": rng.normal(0, 1, 32).astype(np.float16),
        "empty.last": np.zeros((4, 0), np.float32),
    }
    write_tensors(tmp_path / "m.safetensors", model)
    header = read_header(tmp_path / "m.safetensors")
    assert header.data_start + max(t.end for t in header.tensors) == header.file_size
    _, back = read_tensors(tmp_path / "m.safetensors")
    assert same_bits(back, model)

    deltas = {
        "empty.first": np.zeros((0,), np.float32),
        "w": rng.normal(0, 0.1, (8, 16)).astype(np.float32),
        "empty.last": np.zeros((4, 0), np.float32),
        "v": rng.normal(0, 0.1, 32).astype(np.float32),
    }
    dtypes = {"v": "F16"}
    sig = Signature.from_deltas(deltas, dtypes=dtypes, name="z").quantize(4, group=8)
    assert not sig["empty.first"].is_quantized and sig["w"].is_quantized
    sig.save(tmp_path / "z.rws")
    loaded = Signature.load(tmp_path / "z.rws")
    assert loaded.content_hash == sig.content_hash and loaded["empty.last"].shape == (4, 0)

    before = sha(tmp_path / "m.safetensors")
    apply_file(tmp_path / "m.safetensors", [tmp_path / "z.rws"], 0.5, tmp_path / "p.safetensors")
    expect = copy_model(model)
    apply(expect, loaded, 0.5)
    _, got = read_tensors(tmp_path / "p.safetensors")
    assert same_bits(got, expect)
    assert main(["inspect", str(tmp_path / "z.rws")]) == 0
    assert main(["inspect", str(tmp_path / "p.safetensors")]) == 0
    capsys.readouterr()
    remove_file(tmp_path / "p.safetensors", tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == before == sha(tmp_path / "m.safetensors")

    # A header-only file (no data at all) is a valid, empty container.
    (tmp_path / "empty.safetensors").write_bytes(raw("{}" + " " * 6))
    assert read_tensors(tmp_path / "empty.safetensors")[1] == {}


def test_metadata_nested_to_the_limit_round_trips(base, tmp_path):
    """The depth limit leaves room: provenance nested to depth 60 saves, loads, applies."""
    pre, clean, robust = trio(0)
    deep: object = 1
    for _ in range(55):
        deep = [deep]
    sig = extract(pre, clean, robust, layers="all", provenance={"deep": deep}).quantize(4)
    sig.save(tmp_path / "deep.rws")
    again = Signature.load(tmp_path / "deep.rws")
    assert again.content_hash == sig.content_hash
    apply_file(base.model, [tmp_path / "deep.rws"], 1.0, tmp_path / "p.safetensors")
    remove_file(tmp_path / "p.safetensors", tmp_path / "r.safetensors")
    assert sha(tmp_path / "r.safetensors") == sha(base.model)


# ---------------------------------------------------------------------------- engine API


ENGINE_PROBE = r"""
import numpy as np
from robustpatch import _core
e8, one, zero = np.zeros(0, np.uint8), np.ones(1, np.float32), np.zeros(1, np.float32)
huge = 1 << 62
calls = {
    "QuantTensor": lambda: _core.QuantTensor(e8, one, zero, 4, "affine", huge, huge),
    "unpack": lambda: _core.unpack(e8, 4, huge),
    "QuantTensor 1 bit": lambda: _core.QuantTensor(e8, one, zero, 1, "affine", huge, huge),
    "QuantTensor 8 bits": lambda: _core.QuantTensor(e8, one, zero, 8, "affine", huge, huge),
}
for name, call in calls.items():
    print("calling", name, flush=True)
    try:
        call()
        print(name, "accepted")
    except ValueError as e:
        print(name, "ValueError", e)
    except BaseException as e:
        print(name, "BAD", type(e).__name__, e)
"""


def test_engine_calls_with_huge_element_counts_fail_cleanly():
    """Element counts whose packed size overflows 64 bits must be refused before any
    allocation (in a child: an allocation failure aborts the whole process)."""
    proc = subprocess.run(
        [sys.executable, "-c", ENGINE_PROBE], capture_output=True, text=True, timeout=120
    )
    lines = [ln for ln in proc.stdout.splitlines() if not ln.startswith("calling ")]
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, f"the engine aborted (rc {proc.returncode}) in {last!r}"
    assert len(lines) == 4 and all(" ValueError " in ln for ln in lines), proc.stdout


# ---------------------------------------------------------------------------- no pickle

PACKAGE = Path(robustpatch.__file__).parent
#: The one place pickle is read: CIFAR-10/100's own "python version" release is a set of
#: pickle files (the dataset's format); its unpickler refuses every global but numpy arrays.
ALLOWED_PICKLE = {("lab/datasets.py", "_unpickle", "_ArraysOnlyUnpickler")}


def _calls(tree: ast.AST):
    """(dotted callee, call node, enclosing function name) for every call in a module."""
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        parts, f = [], node.func
        while isinstance(f, ast.Attribute):
            parts.append(f.attr)
            f = f.value
        if isinstance(f, ast.Name):
            parts.append(f.id)
        callee = ".".join(reversed(parts))
        scope, p = "<module>", node
        while p in parents:
            p = parents[p]
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                scope = p.name
                break
        yield callee, node, scope


def _kw(node: ast.Call, name: str):
    for k in node.keywords:
        if k.arg == name:
            return k.value
    return None


def test_nothing_in_the_package_loads_pickle():
    found, allowed_seen = [], set()
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), rel)
        for node in ast.walk(tree):  # no pickle-based loaders imported under another name
            if isinstance(node, ast.ImportFrom) and node.module in ("pickle", "dill", "joblib"):
                found.append(f"{rel}:{node.lineno}: from {node.module} import ...")
        for callee, node, scope in _calls(tree):
            last = callee.rsplit(".", 1)[-1]
            where = f"{rel}:{node.lineno} ({scope}): {callee}"
            if callee in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load") or (
                callee.endswith("Unpickler")
            ):
                if (rel, scope, callee) in ALLOWED_PICKLE:
                    allowed_seen.add((rel, scope, callee))
                else:
                    found.append(where)
            elif callee == "torch.load" or (last == "load" and callee.startswith("torch")):
                wo = _kw(node, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    found.append(where + " without weights_only=True")
            elif callee in ("np.load", "numpy.load"):
                ap = _kw(node, "allow_pickle")
                if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                    found.append(where + " with allow_pickle")
            elif last in ("read_pickle", "joblib_load") or callee == "joblib.load":
                found.append(where)
    assert not found, "pickle loading found:\n" + "\n".join(found)
    assert allowed_seen <= ALLOWED_PICKLE


def test_the_grep_would_catch_a_torch_load_without_weights_only():
    """The checker itself: it flags what it must (so the test above can fail)."""
    src = "import torch, numpy as np, pickle\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n"
    hits = [c for c, node, _ in _calls(ast.parse(src))]
    assert hits == ["torch.load", "np.load"]
    assert (
        _kw(next(n for c, n, _ in _calls(ast.parse(src)) if c == "torch.load"), "weights_only")
        is None
    )


@pytest.mark.torch
def _save_trio_pt(folder: Path, torch) -> dict[str, Path]:
    """The pretrained, clean and robust models of ``trio(0)`` as .pt state dicts."""
    paths = {}
    for name, m in zip(("pre", "clean", "robust"), trio(0)):
        paths[name] = folder / f"{name}.pt"
        torch.save({k: torch.from_numpy(v.copy()) for k, v in m.items()}, paths[name])
    return paths


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("truncated", "not a readable torch checkpoint"),
        ("garbage", "not a readable torch checkpoint"),
        ("sparse", "is a torch.sparse_coo tensor"),
        ("nested", "'nested' holds a dict, not a tensor"),
        ("complex", "is a complex tensor"),
    ],
)
def test_a_damaged_or_odd_pt_checkpoint_is_a_one_line_error(tmp_path, capsys, case, message):
    torch = pytest.importorskip("torch")
    paths = _save_trio_pt(tmp_path, torch)
    odd = tmp_path / "odd.pt"
    state = torch.load(paths["robust"], weights_only=True)
    if case == "truncated":
        odd.write_bytes(paths["robust"].read_bytes()[:-300])
    elif case == "garbage":
        odd.write_bytes(bytes(range(256)) * 8)
    else:
        extra = {
            "sparse": torch.eye(3).to_sparse(),
            "nested": {"a": torch.zeros(2)},
            "complex": torch.zeros(2, dtype=torch.complex64),
        }[case]
        torch.save({**state, case: extra}, odd)
    out = tmp_path / "sig.rws"
    before = listing(tmp_path)
    code = main(["extract", str(paths["pre"]), str(paths["clean"]), str(odd), "-o", str(out)])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if not ln.startswith("robustpatch: warning: ")]
    assert code == 1 and "Traceback" not in err and len(errors) == 1, err
    assert re.search(message, errors[0]) and str(odd) in errors[0], err
    assert listing(tmp_path) == before


@pytest.mark.torch
def test_a_pt_checkpoint_is_read_with_weights_only(tmp_path, capsys):
    """A .pt file whose pickle would run code is refused (and the code never runs); a
    plain state dict loads."""
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    ckpts = _save_trio_pt(tmp_path, torch)
    evil = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(2), "x": Evil()}, evil)

    sig = extract(ckpts["pre"], ckpts["clean"], ckpts["robust"], layers="all")
    assert len(sig) > 0
    with pytest.raises(Exception) as info:
        extract(ckpts["pre"], evil, ckpts["robust"], layers="all")
    assert not marker.exists(), "unpickling ran code"
    assert "weights" in str(info.value).lower() or "unpickl" in type(info.value).__name__.lower()

    out = tmp_path / "sig.rws"
    code = main(["extract", str(ckpts["pre"]), str(evil), str(ckpts["robust"]), "-o", str(out)])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert code == 1 and "Traceback" not in err and not out.exists()
    assert len(err.strip().splitlines()) == 1 and err.startswith("robustpatch: error: "), err
    # torch 2.3 names the refused global "Unsupported class", later versions "Unsupported global".
    assert "weights_only=True" in err and re.search("Unsupported (global|class)", err), err


def test_metadata_inspect_would_print_as_given_is_refused(tmp_path, capsys):
    # "signature '5' (method {'a': 1})" and "applied 5 alpha=x hash=None", exit 0
    import json

    from robustpatch._format.safetensors import read_header, read_tensors, write_tensors
    from robustpatch.cli import main
    from robustpatch.files import APPLIED_KEY
    from robustpatch.signature import META_KEY, Signature

    sig = Signature.from_deltas({"w": np.ones(4, np.float32)}, name="s")
    sig.save(tmp_path / "s.rws")
    header, tensors = read_tensors(tmp_path / "s.rws")
    for key, value, why in (
        ("name", 5, "name is not a string"),
        ("method", {"a": 1}, "'method' in the metadata is not a string"),
    ):
        meta = json.loads(header.metadata[META_KEY]) | {key: value}
        write_tensors(tmp_path / "bad.rws", tensors, {META_KEY: json.dumps(meta)})
        assert main(["inspect", str(tmp_path / "bad.rws")]) == 1
        assert why in capsys.readouterr().err
    for applied in ([{"name": 5, "alpha": "x"}], [{}]):
        write_tensors(
            tmp_path / "m.safetensors",
            {"w": np.ones(4, np.float32)},
            {APPLIED_KEY: json.dumps(applied)},
        )
        assert main(["inspect", str(tmp_path / "m.safetensors")]) == 1
        assert "is not a list of {name, hash, alpha}" in capsys.readouterr().err
    assert read_header(tmp_path / "s.rws")  # the good one still reads
