"""The CLI at its edges, as a new user meets them: outputs that would replace inputs,
bad values, files that are not safetensors, I/O errors, flags named as flags, options in
any position, a closed pipe, --version/--help, --json everywhere, and the subtract,
combine and detect commands."""

from __future__ import annotations

import errno
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import robustpatch
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.cli import build_parser, main
from robustpatch.files import apply_file
from robustpatch.signature import Signature, combine
from rp_testutil import listing, sha, trio, usage_error

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(capsys, *argv) -> str:
    code, out, err = run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code == 1 and out == "", err
    assert len(lines) == 1 and lines[0].startswith("robustpatch: error: "), err
    return lines[0]


@pytest.fixture()
def d(tmp_path, capsys):
    """The trio as files, fog.rws extracted from it (all layers), a patched model p."""
    for name, m in zip(("pre", "clean", "robust"), trio(0)):
        write_tensors(tmp_path / f"{name}.safetensors", m)
    models = [tmp_path / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    assert run(capsys, "extract", *models, "-o", tmp_path / "fog.rws", "--layers", "all")[0] == 0
    apply_file(tmp_path / "clean.safetensors", tmp_path / "fog.rws", 0.5, tmp_path / "p")
    return tmp_path


# ---------------------------------------------------------------------------- finding 1


def _same_file_cases():
    models = ["{d}/pre.safetensors", "{d}/clean.safetensors", "{d}/robust.safetensors"]
    return [
        ("extract_over_robust", ["extract", *models, "-o", "{d}/robust.safetensors"]),
        ("extract_over_pre", ["extract", *models, "-o", "{d}/pre.safetensors", "--overwrite"]),
        ("quantize_in_place", ["quantize", "{d}/fog.rws", "-o", "{d}/fog.rws", "--overwrite"]),
        ("quantize_via_symlink", ["quantize", "{d}/fog.rws", "-o", "{d}/link.rws"]),
        ("quantize_via_hard_link", ["quantize", "{d}/fog.rws", "-o", "{d}/hard.rws"]),
        (
            "apply_over_signature",
            ["apply", "{d}/clean.safetensors", "{d}/fog.rws", "-o", "{d}/fog.rws"],
        ),
        (
            "apply_record_over_model",
            ["apply", "{d}/clean.safetensors", "{d}/fog.rws", "-o", "{d}/q", "--overwrite"],
        ),
        ("subtract_over_model", ["subtract", "{d}/p", "{d}/fog.rws", "-o", "{d}/p", "--overwrite"]),
        ("remove_over_record", ["remove", "{d}/p", "-o", "{d}/p.rpundo", "--overwrite"]),
        ("combine_over_part", ["combine", "{d}/fog.rws", "{d}/hard.rws", "-o", "{d}/hard.rws"]),
    ]


@pytest.mark.parametrize(
    ("case", "argv"), _same_file_cases(), ids=[c for c, _ in _same_file_cases()]
)
def test_no_command_writes_over_one_of_its_inputs(d, capsys, case, argv):
    (d / "link.rws").symlink_to(d / "fog.rws")
    os.link(d / "fog.rws", d / "hard.rws")
    os.link(d / "clean.safetensors", d / "q.rpundo")  # apply -o q would write q.rpundo
    before = listing(d)
    line = one_line_error(capsys, *(a.format(d=d) for a in argv))
    assert "is the input" in line and "write to another file" in line
    assert listing(d) == before


def test_an_existing_output_is_replaced_only_with_overwrite(d, capsys):
    q = d / "fog4.rws"
    q.write_bytes(b"mine")
    line = one_line_error(capsys, "quantize", d / "fog.rws", "-o", q)
    assert line == f"robustpatch: error: {q}: already exists (--overwrite replaces it)"
    assert q.read_bytes() == b"mine"
    assert run(capsys, "quantize", d / "fog.rws", "-o", q, "--overwrite")[0] == 0
    assert Signature.load(q)["conv1.weight"].quant.bits == 4
    # apply's undo record is an output too
    (d / "new.rpundo").write_bytes(b"old record")
    before = listing(d)
    line = one_line_error(capsys, "apply", d / "clean.safetensors", d / "fog.rws", "-o", d / "new")
    assert "new.rpundo: already exists" in line and listing(d) == before


def test_an_output_that_is_a_fifo_or_a_symlink_to_nothing_is_never_replaced(d, capsys):
    fifo, dangling = d / "fifo", d / "dangling"
    os.mkfifo(fifo)
    dangling.symlink_to(d / "nowhere")
    before = listing(d)
    line = one_line_error(
        capsys, "apply", d / "clean.safetensors", d / "fog.rws", "-o", fifo, "--overwrite"
    )
    assert "exists and is not a regular file" in line
    line = one_line_error(capsys, "apply", d / "clean.safetensors", d / "fog.rws", "-o", dangling)
    assert f"{dangling}: already exists" in line
    assert listing(d) == before and fifo.is_fifo() and dangling.is_symlink()


def test_the_api_never_replaces_a_fifo_or_a_folder_with_a_file(d):
    # Signature.save swapped a FIFO (as root, a device such as /dev/null) for a file
    from robustpatch.errors import InvalidArgumentError

    fifo, folder = d / "out.rws", d / "folder.rws"
    os.mkfifo(fifo)
    folder.mkdir()
    sig = Signature.load(d / "fog.rws")
    before = listing(d)
    with pytest.raises(InvalidArgumentError, match="exists and is not a regular file"):
        sig.save(fifo)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        sig.save(folder)
    with pytest.raises(InvalidArgumentError, match="exists and is not a regular file"):
        apply_file(d / "clean.safetensors", d / "fog.rws", 1.0, fifo, undo=False)
    assert listing(d) == before and fifo.is_fifo()


def test_remove_never_writes_over_the_signature_its_record_refers_to(d, capsys):
    # p's record refers to the dense fog.rws by content hash; remove reads it from there
    before = listing(d)
    line = one_line_error(capsys, "remove", d / "p", "-o", d / "fog.rws", "--overwrite")
    assert f"output {d / 'fog.rws'} is the input" in line
    assert listing(d) == before
    assert run(capsys, "remove", d / "p", "-o", d / "restored", "--json")[0] == 0
    assert sha(d / "restored") == sha(d / "clean.safetensors")


@pytest.mark.parametrize("applied", ["[1, 2]", '["fog"]', '{"name": "fog"}', "[[]]", "[{"])
def test_a_model_whose_applied_list_is_not_objects_is_a_one_line_error(d, capsys, applied):
    m = d / "odd.safetensors"
    write_tensors(m, read_tensors(d / "clean.safetensors")[1], {"robustpatch.applied": applied})
    before = listing(d)
    for argv in (["inspect", m], ["apply", m, d / "fog.rws", "-o", d / "x.safetensors"]):
        line = one_line_error(capsys, *argv)
        what = "is not valid JSON" if applied == "[{" else "is not a list of {name, hash, alpha}"
        assert f"{m}: robustpatch.applied metadata {what}" in line
    assert listing(d) == before


# ---------------------------------------------------------------------------- findings 2, 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["quantize", "{d}/fog.rws", "-o", "{d}/x.rws", "--bits", "-3"],
            "expected bits from 1 to 8",
        ),
        (
            ["quantize", "{d}/fog.rws", "-o", "{d}/x.rws", "--bits", "9"],
            "expected bits from 1 to 8",
        ),
        (["quantize", "{d}/fog.rws", "-o", "{d}/x.rws", "--group", "0"], "positive integer"),
        (["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--bits", "0"], "expected bits"),
        (
            ["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--layers", "(["],
            "invalid regex '(['",
        ),
        (
            ["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--layers", "a{{99999999999}}"],
            "repetition number is too large",
        ),
        (["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--param-budget", "0"], "(0, 1]"),
        (["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--param-budget", "1.5"], "(0, 1]"),
        (["extract", "{m}", "{m}", "{m}", "-o", "{d}/x.rws", "--energy", "2"], "(0, 1]"),
    ],
)
def test_bad_values_are_refused_at_the_edge(d, capsys, argv, message):
    before = listing(d)
    m = d / "clean.safetensors"
    line = usage_error(capsys, *(a.format(d=d, m=m) for a in argv))
    assert line.startswith(f"robustpatch {argv[0]}: error: argument") and message in line
    assert listing(d) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["apply", "{x}/m", "{x}/a.rws", "--alpha", "1", "--alpha", "2", "-o", "{x}/o"], "1 sig"),
        (["apply", "{x}/m", "{x}/a.rws", "--inplace", "-o", "{x}/o"], "either -o"),
        (
            ["combine", "{x}/a.rws", "{x}/b.rws", "--coef", "1", "--coef", "2", "--coef", "3"],
            "--coef",
        ),
        (["extract", "-", "{x}/m", "{x}/m", "-o", "{x}/o", "--scheme", "log"], "--bits"),
        (["extract", "-", "{x}/m", "{x}/m", "-o", "{x}/o", "--provenance", "k"], "KEY=VALUE"),
        (["detect", "{x}/a.rws", "--model", "{x}/m"], "--model needs --base"),
        (["onnx", "export", "{x}/m", "--alpha", "2", "-o", "{x}/o"], "--alpha needs --signature"),
        (["apply", "{x}/m", "{x}/a.rws", "-o", "{x}/o", "--no-undo", "--embed-signature"], "undo"),
    ],
)
def test_flags_that_do_not_go_together_are_usage_errors(tmp_path, capsys, argv, message):
    # exit 2 with the usage line, as argparse's own errors, before any file is looked at:
    # the inputs here do not exist, and a check that read them first would say so (exit 1)
    argv = [a.format(x=tmp_path / "missing") for a in argv]
    if argv[0] == "combine":
        argv += ["-o", str(tmp_path / "c.rws")]
    line = usage_error(capsys, *argv)
    assert line.startswith(f"robustpatch {argv[0]}") and message in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["apply", "{d}/clean.safetensors", "{d}/fog.rws", "-o", "{d}/new/"],
        ["remove", "{d}/p", "-o", "{d}/new/"],
        ["quantize", "{d}/fog.rws", "-o", "{d}/new/"],
        ["combine", "{d}/fog.rws", "{d}/fog.rws", "-o", "{d}/new/"],
        [
            "extract",
            "-",
            "{d}/clean.safetensors",
            "{d}/robust.safetensors",
            "-o",
            "{d}/new/",
            "--method",
            "difference",
        ],
    ],
)
def test_a_file_output_named_as_a_folder_is_refused(d, capsys, argv):
    # "-o new/" wrote a file called "new" (and "new.rpundo"); cp refuses such a name
    before = listing(d)
    line = one_line_error(capsys, *(a.format(d=d) for a in argv))
    assert f"{d}/new/' ends with '/'" in line
    assert listing(d) == before


@pytest.mark.torch
def test_demo_checks_the_device_before_creating_its_folder(tmp_path, capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for device, message in [("cuda", "torch.cuda.is_available() is False"), ("tpu", "cpu, cuda")]:
        line = usage_error(capsys, "demo", "--device", device, "--out", tmp_path / "r")
        assert message in line and not (tmp_path / "r").exists()
    for device in ("cpu", "cpu:0"):  # a CPU index is no CUDA device
        assert build_parser().parse_args(["demo", "--device", device]).device == device


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--group", "64"], "--group"),
        (["--scheme", "symmetric", "--granularity", "channel"], "--scheme, --granularity"),
    ],
)
def test_extract_refuses_quantization_options_without_bits(d, capsys, options, named):
    # they were ignored silently: the signature came out dense
    before = listing(d)
    m = d / "clean.safetensors"
    line = usage_error(capsys, "extract", "-", m, m, "-o", d / "x.rws", *options)
    assert f"{named} only applies with --bits" in line
    assert listing(d) == before


# ---------------------------------------------------------------------------- finding 4


def test_a_file_that_is_not_safetensors_is_called_so(d, capsys):
    text = d / "notes.safetensors"
    text.write_text("These are my notes about the model, not weights.\n" * 20)
    bracket = d / "list.safetensors"  # a plausible length, but no JSON object after it
    bracket.write_bytes((8).to_bytes(8, "little") + b"[1,2,3] ")
    for path in (text, bracket):
        line = one_line_error(capsys, "inspect", path)
        assert line.startswith(f"robustpatch: error: {path}: not a safetensors file")
        line = one_line_error(capsys, "apply", d / "clean.safetensors", path, "-o", d / "o")
        assert f"{path}: not a safetensors file" in line
    damaged = d / "damaged.safetensors"  # a safetensors file with a broken header: not so
    damaged.write_bytes((12).to_bytes(8, "little") + b'{"a": {"dty' + b"\0" * 8)
    line = one_line_error(capsys, "inspect", damaged)
    assert "not a safetensors file" not in line and str(damaged) in line


# ---------------------------------------------------------------------------- finding 5


def test_io_errors_name_the_path_the_user_gave(d, capsys):
    out = d / "missing" / "fog4.rws"
    line = one_line_error(capsys, "quantize", d / "fog.rws", "-o", out)
    assert line == f"robustpatch: error: {out}: No such file or directory"
    (d / "afile").write_text("x")
    out = d / "afile" / "p.safetensors"
    line = one_line_error(capsys, "apply", d / "clean.safetensors", d / "fog.rws", "-o", out)
    assert line == f"robustpatch: error: {out}: Not a directory"
    (d / "adir").mkdir()
    line = one_line_error(capsys, "quantize", d / "fog.rws", "-o", d / "adir", "--overwrite")
    assert line == f"robustpatch: error: {d / 'adir'}: is a folder; write to a file"
    assert ".tmp" not in line and [p.name for p in d.iterdir() if p.suffix == ".tmp"] == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_named_by_the_output_path(d, capsys):
    ro = d / "ro"
    ro.mkdir(mode=0o500)
    line = one_line_error(capsys, "quantize", d / "fog.rws", "-o", ro / "q.rws")
    assert line == f"robustpatch: error: {ro / 'q.rws'}: Permission denied"


def test_a_refused_temporary_file_is_named_by_the_output_path(d, capsys, monkeypatch):
    """As root no folder refuses a write: the refusal of the temporary file is simulated,
    with the temp file's own name, as the system reports it."""
    from robustpatch._io import atomic

    def refuse(prefix: str, suffix: str, dir: str):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x{suffix}")

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    out = d / "q.rws"
    line = one_line_error(capsys, "quantize", d / "fog.rws", "-o", out)
    assert line == f"robustpatch: error: {out}: Permission denied"
    assert not out.exists()


# ---------------------------------------------------------------------------- findings 6, 7


@pytest.fixture()
def half(d):
    """clean with fc.weight in bfloat16 (fog.rws was made for float32), and a twin whose
    conv2.weight is reshaped (same element count)."""
    _, clean, _ = trio(0, fc_dtype="bf16")
    write_tensors(d / "half.safetensors", clean)
    clean["conv2.weight"] = clean["conv2.weight"].reshape(16, 32, 3, 3)
    write_tensors(d / "reshaped.safetensors", clean)
    return d


def test_errors_name_cli_flags_not_library_keywords(half, capsys):
    d = half
    line = one_line_error(capsys, "apply", d / "half.safetensors", d / "fog.rws", "-o", d / "o")
    assert "BF16" in line and "(--allow-dtype-change to apply anyway)" in line and "=" not in line
    line = one_line_error(
        capsys,
        "apply",
        d / "reshaped.safetensors",
        d / "fog.rws",
        "-o",
        d / "o",
        "--allow-dtype-change",
    )
    assert "differs from the signature's" in line and "--force to apply anyway" in line
    argv = ["apply", d / "clean.safetensors", d / "fog.rws", "-o", d / "n", "--no-undo"]
    assert run(capsys, *argv)[0] == 0
    line = one_line_error(capsys, "remove", d / "n", "-o", d / "r")
    assert "written with --no-undo?" in line and "undo=False" not in line


def test_allow_dtype_change_relaxes_only_the_dtype(half, capsys):
    d = half
    argv = ["apply", d / "half.safetensors", d / "fog.rws", "-o", d / "a", "--allow-dtype-change"]
    assert run(capsys, *argv)[0] == 0
    apply_file(d / "half.safetensors", d / "fog.rws", 1.0, d / "f", force=True)
    assert sha(d / "a") == sha(d / "f")  # the patch --force would write
    _, got = read_tensors(d / "a")
    _, was = read_tensors(d / "half.safetensors")
    assert got["fc.weight"].dtype == np.uint16 and not np.array_equal(
        got["fc.weight"], was["fc.weight"]
    )
    assert run(capsys, "remove", d / "a", "-o", d / "r")[0] == 0
    assert sha(d / "r") == sha(d / "half.safetensors")


# ---------------------------------------------------------------------------- findings 8, 9


def test_quiet_and_json_work_before_or_after_the_subcommand(d, capsys):
    outs = [
        run(capsys, *argv)[1]
        for argv in (
            ["--json", "inspect", d / "fog.rws"],
            ["inspect", d / "fog.rws", "--json"],
            ["inspect", "--json", "-q", d / "fog.rws"],
        )
    ]
    assert outs[0] == outs[1] == outs[2] and json.loads(outs[0])["kind"] == "signature"
    for i, argv in enumerate((["-q", "quantize"], ["quantize", "-q"], ["quantize", "--quiet"])):
        code, out, err = run(capsys, *argv, d / "fog.rws", "-o", d / f"q{i}.rws")
        assert (code, out, err) == (0, "", "")
    assert "demo has no --json output" in usage_error(capsys, "--json", "demo")


def test_mismatch_errors_name_the_model_file(d, capsys):
    # "the model has no tensor 'fc.weight' (signature 'fog' touches it)": which model?
    write_tensors(d / "small.safetensors", {"other": np.ones(4, np.float32)})
    line = one_line_error(capsys, "apply", d / "small.safetensors", d / "fog.rws", "-o", d / "o")
    assert line.startswith(f"robustpatch: error: {d / 'small.safetensors'}: the model has no")


def test_options_between_positionals_as_after_them(d, capsys):
    """``apply m fog.rws -q fog.rws``: an option between two files does not end the
    list of files (plain argparse refused the second one as an unrecognized argument)."""
    m, s = d / "clean.safetensors", d / "fog.rws"
    split = run(capsys, "apply", m, s, "--json", s, "-o", d / "a", "--alpha", "0.5", "-q")
    whole = run(capsys, "apply", m, s, s, "--json", "-o", d / "b", "--alpha", "0.5", "-q")
    assert split[0] == whole[0] == 0 and sha(d / "a") == sha(d / "b")
    assert json.loads(split[1])["signatures"] == [str(s), str(s)]
    line = usage_error(capsys, "apply", m, s, "--bogus", s, "-o", d / "c")
    assert "unrecognized arguments: --bogus" in line and not (d / "c").exists()


def test_a_closed_stdout_ends_quietly_with_141(d):
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustpatch.cli", "inspect", "--json", d / "fog.rws"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    proc.stdout.close()  # like `| head -1` gone before the first write
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and err == b""


# ---------------------------------------------------------------------------- findings 10, 11


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"robustpatch {robustpatch.__version__}\n"
    assert robustpatch.__version__ == importlib.metadata.version("robustpatch")


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("bits per weight, 1-8 (default: 4)", "(default: affine)", "(default: 128)"):
        assert default in out
    assert "(default: None)" not in out and "(default: False)" not in out


# ---------------------------------------------------------------------------- findings 12, 13


def test_every_printing_command_prints_one_json_object(d, capsys):
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    calls = {
        "extract": ["extract", *models, "-o", d / "e.rws"],
        "quantize": ["quantize", d / "fog.rws", "-o", d / "q.rws"],
        "apply": ["apply", models[1], d / "fog.rws", "-o", d / "a"],
        "subtract": ["subtract", d / "a", d / "fog.rws", "-o", d / "s"],
        "remove": ["remove", d / "a", "-o", d / "r"],
        "inspect": ["inspect", d / "a"],
        "similarity": ["similarity", d / "fog.rws", d / "q.rws"],
        "combine": ["combine", d / "fog.rws", d / "q.rws", "-o", d / "c.rws"],
        "detect": ["detect", d / "fog.rws", "--query", d / "q.rws"],
    }
    for name, argv in calls.items():
        code, out, _ = run(capsys, *argv, "--json")
        assert code == 0 and isinstance(json.loads(out), dict), name  # the whole of stdout
    code, out, _ = run(capsys, "--json", "apply", models[1], d / "fog.rws", "-o", d / "a2")
    rep = json.loads(out)
    assert rep["file"] == str(d / "a2") and rep["undo"] == str(d / "a2.rpundo")


def test_similarity_labels_rows_by_file(d, capsys):
    (d / "x").mkdir()
    for path in (d / "b.rws", d / "x" / "fog.rws"):
        path.write_bytes((d / "fog.rws").read_bytes())  # all three named 'fog' inside
    code, out, _ = run(capsys, "similarity", d / "fog.rws", d / "b.rws", d / "x" / "fog.rws")
    labels = [str(d / "fog.rws"), "b.rws", str(d / "x" / "fog.rws")]
    rows = out.splitlines()
    assert code == 0 and rows[0].split() == labels
    assert [r.split()[0] for r in rows[1:]] == labels
    rep = json.loads(run(capsys, "similarity", d / "fog.rws", d / "b.rws", "--json")[1])
    assert rep["labels"] == ["fog.rws", "b.rws"] and rep["names"] == ["fog", "fog"]


# ---------------------------------------------------------------------------- finding 14


def test_subtract_takes_the_signature_out_to_within_one_rounding(d, capsys):
    assert run(capsys, "subtract", d / "p", d / "fog.rws", "--alpha", "0.5", "-o", d / "s")[0] == 0
    _, s = read_tensors(d / "s")
    _, p = read_tensors(d / "p")
    _, c = read_tensors(d / "clean.safetensors")
    for name in ("conv1.weight", "conv2.weight", "fc.weight"):
        assert not np.array_equal(s[name], p[name])
        # p = round(c + δ/2), s = round(p − δ/2): off by at most half an ulp of each
        ulp = np.spacing(np.maximum(np.abs(p[name]), np.abs(s[name])))
        assert np.all(np.abs(s[name] - c[name]) <= ulp), name
    assert np.array_equal(s["bn1.running_mean"], p["bn1.running_mean"])  # left as they were
    rep = json.loads(run(capsys, "inspect", d / "s", "--json")[1])
    assert [a["alpha"] for a in rep["applied"]] == [0.5, -0.5]


def test_combine_writes_the_weighted_sum(d, capsys):
    models = [d / f"{n}.safetensors" for n in ("pre", "clean")]
    for_noise = d / "noise.safetensors"
    write_tensors(for_noise, trio(1)[2])
    assert (
        run(
            capsys,
            "extract",
            "-",
            models[1],
            for_noise,
            "-o",
            d / "n.rws",
            "--method",
            "difference",
        )[0]
        == 0
    )
    argv = ["combine", d / "fog.rws", d / "n.rws", "--coef", "1", "--coef", "0.5"]
    assert run(capsys, *argv, "-o", d / "mix.rws")[0] == 0
    want = combine([Signature.load(d / "fog.rws"), Signature.load(d / "n.rws")], [1.0, 0.5])
    got = Signature.load(d / "mix.rws")
    assert got.content_hash == want.content_hash and got.name == "fog+0.5*n"
    line = usage_error(capsys, *argv, "--coef", "2", "-o", d / "bad.rws")
    assert "2 signatures but 3 --coef values" in line


def test_detect_ranks_the_signature_a_model_change_matches_first(d, capsys):
    other = d / "other"
    other.mkdir()
    for name, m in zip(("pre", "clean", "robust"), trio(1)):
        write_tensors(other / f"{name}.safetensors", m)
    models = [other / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    assert run(capsys, "extract", *models, "-o", other / "snow.rws", "--layers", "all")[0] == 0
    library = [other / "snow.rws", d / "fog.rws"]
    argv = ["--model", d / "robust.safetensors", "--base", d / "clean.safetensors", "--json"]
    rep = json.loads(run(capsys, "detect", *library, *argv)[1])
    assert [r["label"] for r in rep["ranking"]] == ["fog.rws", "snow.rws"]
    assert rep["ranking"][0]["cosine"] > rep["ranking"][1]["cosine"]
    code, out, _ = run(capsys, "detect", *library, "--query", other / "snow.rws")
    assert code == 0 and out.splitlines()[1].split()[0] == "snow.rws"
    line = usage_error(capsys, "detect", *library, "--model", d / "robust.safetensors")
    assert "--model needs --base" in line
    # --base with --query was ignored; a folder (as similarity takes) was "a directory"
    line = usage_error(capsys, "detect", *library, "--query", library[0], "--base", library[0])
    assert "--base goes with --model" in line
    argv = ["detect", other, d / "fog.rws", d / "fog.rws", "--query", other / "snow.rws", "--json"]
    rep = json.loads(run(capsys, *argv)[1])
    assert [r["label"] for r in rep["ranking"]] == ["snow.rws", "fog.rws"]


# ---------------------------------------------------------------------------- finding 15


def test_param_budget_reaches_extract(d, capsys, monkeypatch):
    ex = importlib.import_module("robustpatch.extraction")
    seen = {}
    real = ex.extract_to  # the CLI streams the signature into its file

    def spy(*args, **kwargs):
        seen.update(kwargs)
        if "param_budget" not in inspect.signature(real).parameters:
            kwargs.pop("param_budget")
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "extract_to", spy)
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    assert run(capsys, "extract", *models, "-o", d / "b.rws", "--param-budget", "0.25")[0] == 0
    assert seen["param_budget"] == 0.25 and seen["layers"] == "auto"
    line = usage_error(
        capsys, "extract", *models, "-o", d / "c.rws", "--param-budget", "0.25", "--layers", "2"
    )
    assert "--param-budget cannot be combined with --layers" in line


def test_param_budget_end_to_end(d, capsys):
    from robustpatch.extraction import extract

    if "param_budget" not in inspect.signature(extract).parameters:
        pytest.skip("extract has no param_budget yet")
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    # conv1 (448 parameters) fits in 30% of the toy model's 6 400; conv2 (4 608) does not
    assert run(capsys, "extract", *models, "-o", d / "b.rws", "--param-budget", "0.3")[0] == 0
    sig = Signature.load(d / "b.rws")
    assert {n.split(".")[0] for n in sig.entries} == {"conv1", "bn1"}


def test_extract_says_what_it_left_out_and_warns_in_one_line(d, capsys):
    """The difference method keeps unchanged tensors out (skipped) and lists changed
    ones outside the selection (dropped); a near-zero signature warns in one line."""
    models = [d / f"{n}.safetensors" for n in ("clean", "robust")]
    code, out, _ = run(
        capsys,
        "extract",
        "-",
        *models,
        "-o",
        d / "x.rws",
        "--method",
        "difference",
        "--layers",
        "conv1",
        "--json",
    )
    rep = json.loads(out)
    assert code == 0 and "conv2.weight" in rep["dropped"] and rep["skipped"] == []
    code, out, _ = run(
        capsys,
        "extract",
        "-",
        *models,
        "-o",
        d / "y.rws",
        "--method",
        "difference",
        "--layers",
        "conv1",
    )
    assert code == 0 and f"dropped {len(rep['dropped'])} tensors (changed but outside" in out
    # Five names at most on the line: a model's hundreds stay in --json.
    line = next(ln for ln in out.splitlines() if ln.startswith("dropped"))
    shown = [n for n in rep["dropped"] if n in line]
    assert shown == rep["dropped"][: min(5, len(rep["dropped"]))]
    if len(rep["dropped"]) > 5:
        assert f"and {len(rep['dropped']) - 5} more" in line
    from robustpatch.cli.signatures import _some

    many = [f"layers.{i}.weight" for i in range(227)]
    assert _some(many) == ", ".join(many[:5]) + " and 222 more (--json lists them)"
    assert _some(many[:5]) == ", ".join(many[:5])
    _, clean, _ = trio(0)
    twin = {k: v.copy() for k, v in clean.items()}
    twin["conv1.weight"][0, 0, 0, 0] = np.nextafter(twin["conv1.weight"][0, 0, 0, 0], np.inf)
    write_tensors(d / "twin.safetensors", twin)
    code, _, err = run(
        capsys,
        "extract",
        "-",
        models[0],
        d / "twin.safetensors",
        "-o",
        d / "z.rws",
        "--method",
        "difference",
    )
    lines = err.strip().splitlines()
    assert code == 0 and len(lines) == 1 and lines[0].startswith("robustpatch: warning: ")


@pytest.mark.parametrize("value", ["-2e-1", "-.5E+0", "-1.e-3", "-3"])
def test_a_negative_number_in_any_float_form_is_a_value_not_an_option(d, capsys, value):
    """argparse alone reads ``-2e-1`` as an unknown option (``-0.2`` works)."""
    argv = ["combine", d / "fog.rws", "--coef", value, "-o", d / "c.rws", "--json"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert json.loads(out)["components"][0]["coef"] == float(value)
    assert "--coef" in usage_error(capsys, "combine", d / "fog.rws", "--coef", "-2e-1x", "-o", d)


@pytest.mark.parametrize(
    "argv",
    [
        ["recover", "{f}"],
        ["apply", "{f}", "{d}/fog.rws", "--inplace"],
        ["remove", "{f}", "--inplace"],
        ["extract", "{d}/pre.safetensors", "{d}/clean.safetensors", "{d}/f.pt", "-o", "{d}/x.rws"],
        [
            "extract",
            "{d}/pre.safetensors",
            "{f}.index.json",
            "{d}/robust.safetensors",
            "-o",
            "{d}/x",
        ],
    ],
)
def test_a_fifo_given_as_a_model_is_refused_at_once(d, capsys, argv):
    """Opening a FIFO to read blocks until a writer comes: each command must refuse it
    from its file type, not open it. A writer waits on each FIFO, so that a regression
    reads an empty file and fails here rather than hang."""
    fifos = [d / name for name in ("fifo", "fifo.index.json", "f.pt")]
    writers = []
    for fifo in fifos:
        os.mkfifo(fifo)
        writers.append(threading.Thread(target=lambda f=fifo: open(f, "wb").close(), daemon=True))
        writers[-1].start()
    try:
        line = one_line_error(capsys, *(a.format(d=d, f=d / "fifo") for a in argv))
        assert "is a FIFO, not a regular file" in line
    finally:
        for fifo in fifos:  # a reader that gives up at once lets a waiting writer go
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
        for w in writers:
            w.join(5)


def test_layer_regex_flags_apply_to_the_whole_name(d, capsys):
    """``(?i)`` stays in front of the pattern robustpatch wraps around a --layers value."""
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    upper = run(capsys, "extract", *models, "-o", d / "u.rws", "--layers", "(?i)CONV1", "--json")
    lower = run(capsys, "extract", *models, "-o", d / "l.rws", "--layers", "conv1", "--json")
    assert upper[0] == 0 and lower[0] == 0, upper[2]
    assert json.loads(upper[1])["entries"] == json.loads(lower[1])["entries"] > 0


def test_provenance_values_stay_strict_json(d, capsys):
    """``--provenance a=NaN`` is kept as text: a float NaN in the header made the
    signature's metadata, and ``inspect --json``, invalid JSON for other readers."""
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    argv = ["extract", *models, "-o", d / "p.rws", "--layers", "all"]
    argv += ["--provenance", "a=NaN", "--provenance", "b=[1, Infinity]", "--provenance", "c=0.5"]
    assert run(capsys, *argv)[0] == 0
    code, out, _ = run(capsys, "inspect", d / "p.rws", "--json")
    strict = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in inspect --json"))
    assert code == 0 and strict["provenance"] == {"a": "NaN", "b": "[1, Infinity]", "c": 0.5}


def test_a_pt_checkpoint_without_torch_names_the_extra(d, capsys, monkeypatch):
    """Without torch installed, a .pt input is a one-line error saying how to get it."""
    (d / "m.pt").write_bytes(b"whatever it holds")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    argv = ["extract", d / "pre.safetensors", d / "clean.safetensors", d / "m.pt", "-o", d / "x"]
    assert "pip install 'robustpatch[torch]'" in one_line_error(capsys, *argv)


@pytest.mark.skipif(sys.platform != "linux", reason="a file name that is not UTF-8")
def test_a_file_name_that_is_not_utf8_is_printed_escaped_not_a_traceback(d):
    # with a strict UTF-8 stdout, quantize wrote its output and then crashed printing it
    src = d / os.fsdecode(b"n\xff.rws")
    src.write_bytes((d / "fog.rws").read_bytes())
    out = d / os.fsdecode(b"q\xff.rws")
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    for argv in (["similarity", src, d / "fog.rws"], ["quantize", src, "-o", out]):
        cmd = [sys.executable, "-m", "robustpatch", *map(os.fspath, argv)]
        got = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr
        assert "n\\udcff.rws" in got.stdout or "q\\udcff.rws" in got.stdout
    assert out.exists()


def test_help_and_usage_edges(d, capsys):
    # subtract's -o was "patched model to write"; --layers 0 was exit 1 after reading files;
    # a signature made from deltas was "method None"
    import robustpatch as rp

    with pytest.raises(SystemExit):
        main(["subtract", "--help"])
    assert "the signatures taken out" in capsys.readouterr().out
    models = [d / f"{n}.safetensors" for n in ("pre", "clean", "robust")]
    line = usage_error(capsys, "extract", *models, "-o", d / "x.rws", "--layers", "0")
    assert "at least 1" in line and not (d / "x.rws").exists()
    sig = rp.Signature.from_deltas({"fc.weight": np.ones((2, 2), np.float32)}, name="m")
    sig.save(d / "m.rws")
    assert run(capsys, "inspect", d / "m.rws")[1].count("method not recorded") == 1
    assert rp.SelectionError and rp.ZeroSignatureWarning and "importlib" not in dir(rp)
