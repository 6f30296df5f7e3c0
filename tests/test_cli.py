"""The robustpatch command line: every command, its help, its errors, and an end-to-end
run on a mixed-precision torch model checked against plain torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from robustpatch._format.safetensors import write_tensors
from robustpatch.cli import COMMANDS, build_parser, main
from robustpatch.signature import Signature
from rp_testutil import listing, sha, trio

NAMES = [
    "extract",
    "quantize",
    "apply",
    "subtract",
    "remove",
    "recover",
    "inspect",
    "similarity",
    "combine",
    "detect",
    "batch",
    "demo",
    "onnx",
]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def extract_fog(capsys, d, *extra):
    """``robustpatch extract`` of the ``files`` trio into ``d/fog.rws``."""
    models = (d / f"{n}.safetensors" for n in ("pre", "clean", "robust"))
    return run(capsys, "extract", *models, "-o", d / "fog.rws", *extra)


@pytest.fixture()
def files(tmp_path):
    pre, clean, robust = trio(0)
    for name, m in (("pre", pre), ("clean", clean), ("robust", robust)):
        write_tensors(tmp_path / f"{name}.safetensors", m)
    return tmp_path


def test_every_command_is_registered_and_its_help_has_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert list(sub.choices) == NAMES and len(COMMANDS) == len(NAMES)
    for name in NAMES:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0
        assert "example:" in out and f"robustpatch {name} " in out.split("example:")[1]


def test_extract_quantize_inspect_similarity(files, capsys):
    d = files
    code, out, _ = extract_fog(
        capsys,
        d,
        "--provenance",
        "corruption=fog",
        "--provenance",
        "severity=3",
    )
    assert code == 0 and "fog.rws" in out
    sig = Signature.load(d / "fog.rws")
    assert sig.name == "fog" and sig.meta["provenance"] == {"corruption": "fog", "severity": 3}
    assert sig.meta["layers"]["mode"] == "auto"
    code, out, _ = run(capsys, "quantize", d / "fog.rws", "-o", d / "fog4.rws", "--bits", "4")
    assert code == 0 and Signature.load(d / "fog4.rws")["conv1.weight"].quant.bits == 4
    code, out, _ = run(capsys, "inspect", d / "fog4.rws")
    assert code == 0 and "conv1.weight" in out and "affine" in out and "compression ratio" in out
    code, out, _ = run(capsys, "inspect", d / "fog4.rws", "--json")
    rep = json.loads(out)
    row = {r["name"]: r for r in rep["entries"]}["conv1.weight"]
    assert row["bits"] == 4 and row["shape"] == [16, 3, 3, 3] and row["bytes"] > 0
    assert row["energy"] > 0 and 0 < rep["delta_ratio"] < 0.2
    code, out, _ = run(capsys, "similarity", d / "fog.rws", d / "fog4.rws", "--json")
    m = np.array(json.loads(out)["cosine"])
    assert m.shape == (2, 2) and m[0, 1] > 0.99
    code, out, _ = run(capsys, "similarity", d / "fog.rws", d / "fog4.rws")
    assert code == 0 and "+1.000" in out


def test_inspect_reports_the_compression_ratio_of_a_4_bit_group_128_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    deltas = {"big.weight": rng.normal(0, 1e-3, (1024, 1536)).astype(np.float32)}
    Signature.from_deltas(deltas, name="big").save(tmp_path / "big.rws")
    code, _, _ = run(
        capsys,
        "quantize",
        tmp_path / "big.rws",
        "-o",
        tmp_path / "q.rws",
        "--bits",
        "4",
        "--group",
        "128",
    )
    assert code == 0
    code, out, _ = run(capsys, "inspect", tmp_path / "q.rws", "--json")
    rep = json.loads(out)
    assert rep["file_ratio"] <= 0.15 and rep["delta_ratio"] <= 0.15
    assert rep["file_bytes"] == (tmp_path / "q.rws").stat().st_size
    assert rep["f32_delta_bytes"] == deltas["big.weight"].nbytes
    code, out, _ = run(capsys, "inspect", tmp_path / "q.rws")
    assert f"compression ratio vs the float32 delta {rep['delta_ratio']:.3f}" in out


def test_apply_inspect_remove_round_trip(files, capsys):
    d = files
    extract_fog(capsys, d, "--layers", "all", "--bits", "4")
    code, out, _ = run(
        capsys,
        "apply",
        d / "clean.safetensors",
        d / "fog.rws",
        "--alpha",
        "0.5",
        "-o",
        d / "p.safetensors",
    )
    assert code == 0 and "undo record" in out
    code, out, _ = run(capsys, "inspect", d / "p.safetensors", "--json")
    rep = json.loads(out)
    assert rep["kind"] == "model" and rep["applied"][0]["name"] == "fog"
    assert rep["applied"][0]["alpha"] == 0.5 and rep["undo"].endswith(".rpundo")
    code, out, _ = run(capsys, "inspect", d / "p.safetensors")
    assert "applied 'fog' alpha=0.5" in out
    code, out, _ = run(capsys, "inspect", d / "p.safetensors.rpundo")
    assert code == 0 and "undo record" in out
    code, _, _ = run(capsys, "remove", d / "p.safetensors", "-o", d / "r.safetensors")
    assert code == 0 and sha(d / "r.safetensors") == sha(d / "clean.safetensors")


def test_durable_fsyncs_output_and_record_only_when_asked(files, capsys, monkeypatch):
    """Default writes are atomic but not fsynced (like shutil.copyfile); ``--durable``
    fsyncs the extracted signature, the patched model and its undo record, and
    ``remove --durable`` the restored file, each before its rename."""
    d = files
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert extract_fog(capsys, d)[0] == 0 and synced == []
    assert extract_fog(capsys, d, "--durable", "--overwrite")[0] == 0
    assert len([s for s in synced if s != str(d)]) == 1 and str(d) in synced
    synced.clear()
    model = d / "clean.safetensors"
    assert run(capsys, "apply", model, d / "fog.rws", "-o", d / "a.safetensors")[0] == 0
    assert run(capsys, "remove", d / "a.safetensors", "-o", d / "ra.safetensors")[0] == 0
    assert synced == []
    assert (
        run(capsys, "apply", model, d / "fog.rws", "-o", d / "b.safetensors", "--durable")[0] == 0
    )
    temps = [s for s in synced if s != str(d)]  # the folder is fsynced after the renames
    assert len(temps) == 2 and all(str(d) in s for s in temps) and str(d) in synced
    synced.clear()
    assert (
        run(capsys, "remove", d / "b.safetensors", "-o", d / "rb.safetensors", "--durable")[0] == 0
    )
    assert len([s for s in synced if s != str(d)]) == 1
    assert sha(d / "ra.safetensors") == sha(d / "rb.safetensors") == sha(model)


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("truncate", ["apply", "{model}", "{sig}", "-o", "{out}"], "outside a data buffer"),
        ("none", ["apply", "{model}", "{sig}", "-o", "{model}"], "is the input"),
        ("none", ["apply", "{model}", "{missing}", "-o", "{out}"], "No such file"),
        ("none", ["inspect", "{missing}"], "No such file"),
        ("none", ["remove", "{model}", "-o", "{out}"], "no undo record"),
        ("none", ["extract", "{model}", "{model}", "{sig}", "-o", "{out}"], "not in the robust"),
        ("none", ["quantize", "{model}", "-o", "{out}"], "not a robustpatch signature"),
    ],
)
def test_errors_are_one_line_with_exit_code_1(files, capsys, setup, argv, message):
    d = files
    extract_fog(capsys, d)
    model = d / "clean.safetensors"
    if setup == "truncate":
        model.write_bytes(model.read_bytes()[:-64])
    before = listing(d)
    paths = {
        "model": model,
        "sig": d / "fog.rws",
        "out": d / "out.safetensors",
        "missing": d / "missing.rws",
    }
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("robustpatch: error: ")
    assert message in lines[0] and "Traceback" not in err
    assert listing(d) == before  # input untouched, nothing written


def test_usage_errors_exit_with_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["apply", "model.safetensors"])
    assert e.value.code == 2
    assert "robustpatch apply: error:" in capsys.readouterr().err


def test_demo_threads_must_be_positive_and_reach_the_demo(capsys, tmp_path, monkeypatch):
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--threads", bad])
        assert e.value.code == 2
        assert "expected a positive integer" in capsys.readouterr().err
    demo = pytest.importorskip("robustpatch.lab.demo")
    seen = {}

    def fake_run(out, **kwargs):
        seen.update(kwargs)
        return {"summary": [], "claims": []}

    monkeypatch.setattr(demo, "run", fake_run)
    code, out, _ = run(
        capsys, "--quiet", "demo", "--dataset", "digits", "--threads", "3", "--out", tmp_path
    )
    assert code == 0 and seen["threads"] == 3 and "report:" in out


def test_a_disk_full_write_midway_leaves_no_partial_output(files, capsys):
    """A real failing write: the child's file size limit is below the output's size."""
    import resource

    d = files
    extract_fog(capsys, d, "--layers", "all")
    out = d / "out"
    out.mkdir()
    limit = (d / "clean.safetensors").stat().st_size // 2

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = sha(d / "clean.safetensors")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustpatch.cli",
            "apply",
            d / "clean.safetensors",
            d / "fog.rws",
            "-o",
            out / "p.safetensors",
        ],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("robustpatch: error: ") and "Traceback" not in proc.stderr
    assert "too large" in proc.stderr.lower() or "27" in proc.stderr
    assert listing(out) == {}
    assert sha(d / "clean.safetensors") == before


# ---------------------------------------------------------------------------- torch e2e


@pytest.mark.torch
def test_cli_patch_of_a_mixed_precision_torch_model_matches_plain_torch(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from test_signature_torch import make_nets

    pre, clean, robust = make_nets(1)
    noise = type(clean)().eval()
    noise.load_state_dict(clean.state_dict())
    with torch.no_grad():
        for p in noise.parameters():
            p.add_((torch.randn_like(p.float()) * 0.02).to(p.dtype))
    for name, net in (("pre", pre), ("clean", clean), ("fog", robust), ("noise", noise)):
        save_file(dict(net.state_dict()), tmp_path / f"{name}.safetensors")
    dtypes = {str(v.dtype) for v in clean.state_dict().values()}
    assert {"torch.float32", "torch.float16", "torch.bfloat16"} <= dtypes
    p = {k: tmp_path / f"{k}.safetensors" for k in ("pre", "clean", "fog", "noise")}
    assert (
        run(
            capsys,
            "extract",
            p["pre"],
            p["clean"],
            p["fog"],
            "-o",
            tmp_path / "fog.rws",
            "--layers",
            "all",
            "--bits",
            "4",
        )[0]
        == 0
    )
    assert (
        run(
            capsys,
            "extract",
            p["pre"],
            p["clean"],
            p["noise"],
            "-o",
            tmp_path / "noise.rws",
            "--layers",
            "fc1",
            "--layers",
            "fc2",
        )[0]
        == 0
    )
    assert (
        run(
            capsys,
            "apply",
            p["clean"],
            tmp_path / "fog.rws",
            tmp_path / "noise.rws",
            "--alpha",
            "1",
            "--alpha",
            "0.5",
            "-o",
            tmp_path / "patched.safetensors",
        )[0]
        == 0
    )

    patched = type(clean)().eval()
    patched.load_state_dict(load_file(tmp_path / "patched.safetensors"))
    # The same patch in plain torch: w + 1·deq(fog) + 0.5·noise, rounded once to w's dtype;
    # BatchNorm statistics replaced by the robust model's (α = 1).
    fog, noise_sig = Signature.load(tmp_path / "fog.rws"), Signature.load(tmp_path / "noise.rws")
    reference = type(clean)().eval()
    reference.load_state_dict(clean.state_dict())
    with torch.no_grad():
        for name, w in reference.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                w.copy_(robust.state_dict()[name])
                continue
            if name not in fog.deltas:
                continue
            acc = torch.from_numpy(fog[name].dense())
            if name in noise_sig:
                acc = acc + 0.5 * torch.from_numpy(noise_sig[name].dense())
            w.copy_((w.float() + acc).to(w.dtype))
    got, want = patched.state_dict(), reference.state_dict()
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype, name
        if w.dtype in (torch.float16, torch.bfloat16):
            ulp = torch.finfo(w.dtype).eps * w.float().abs().clamp_min(torch.finfo(w.dtype).tiny)
            assert torch.all((g.float() - w.float()).abs() <= ulp), name
        else:
            assert torch.equal(g, w), name
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(patched(x), reference(x), rtol=0, atol=0)
    assert not torch.equal(patched(x), clean(x))
    assert (
        run(
            capsys,
            "remove",
            tmp_path / "patched.safetensors",
            "-o",
            tmp_path / "restored.safetensors",
        )[0]
        == 0
    )
    assert sha(tmp_path / "restored.safetensors") == sha(p["clean"])
