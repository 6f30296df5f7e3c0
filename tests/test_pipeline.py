"""Batch runs (robustpatch.pipeline, ``robustpatch batch``): manifests, result lines, a
failing job among good ones, resume rules (SIGKILL at random moments included), and the
Ray executor on a real local instance."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import robustpatch as rp
from robustpatch import pipeline
from robustpatch._format.safetensors import read_tensors, write_tensors
from robustpatch.cli import main
from robustpatch.errors import FormatError, InvalidArgumentError
from robustpatch.pipeline.jobs import job_key
from rp_testutil import listing, sha, usage_error

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def make_fleet(d: Path, bases: int = 2, rows: int = 64) -> dict:
    """``bases`` float32 models of 4 tensors and two signatures; a grid manifest over
    them (outputs under ``d/out``) as a JSON-ready dict."""
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    for b in range(bases):
        tensors = {f"l{i}.weight": rng.normal(size=(rows, 64)).astype(np.float32) for i in range(4)}
        write_tensors(d / f"m{b}.safetensors", tensors)
    for s in ("fog", "snow"):
        deltas = {f"l{i}.weight": rng.normal(0, 0.1, (rows, 64)).astype(np.float32) for i in (0, 2)}
        rp.Signature.from_deltas(deltas, name=s).save(d / f"{s}.rws")
    return {
        "grid": {
            "bases": {f"m{b}": f"m{b}.safetensors" for b in range(bases)},
            "signatures": {"fog": ["fog.rws"], "both": ["fog.rws", "snow.rws"]},
            "alphas": [0.5],
            "output": "out/{base}-{signatures}-{alpha}.safetensors",
        }
    }


def write_manifest(d: Path, doc: dict, name: str = "fleet.json") -> Path:
    (d / name).write_text(json.dumps(doc))
    return d / name


def reference(job: pipeline.Job, scratch: Path) -> str:
    """sha256 of the job's output built by one plain apply_file call."""
    out = scratch / (hashlib.sha256(job.output.encode()).hexdigest()[:16] + ".safetensors")
    rp.apply_file(job.base, list(job.signatures), list(job.alphas), out)
    return sha(out)


# ---------------------------------------------------------------------------- manifests


def test_a_grid_expands_to_every_base_signature_set_and_alpha(tmp_path):
    doc = make_fleet(tmp_path)
    doc["grid"]["signatures"] = {"both": ["fog.rws", "snow.rws"], "rev": ["snow.rws", "fog.rws"]}
    doc["grid"]["alphas"] = [0.5, [1, 0.25]]  # one for all, or one per signature
    jobs = pipeline.load_manifest(write_manifest(tmp_path, doc))
    names = [Path(j.output).name for j in jobs]
    assert len(jobs) == 2 * 2 * 2 and len(set(names)) == 8
    assert "m1-both-1-0.25.safetensors" in names
    both = next(j for j in jobs if Path(j.output).name == "m1-both-1-0.25.safetensors")
    assert both.alphas == (1.0, 0.25)
    assert both.signatures == (str(tmp_path / "fog.rws"), str(tmp_path / "snow.rws"))
    assert both.base == str(tmp_path / "m1.safetensors")  # relative to the manifest


def test_yaml_and_json_manifests_give_the_same_jobs(tmp_path):
    yaml = pytest.importorskip("yaml")
    doc = make_fleet(tmp_path)
    doc["jobs"] = [{"base": "m0.safetensors", "signatures": "fog.rws", "output": "x.safetensors"}]
    doc["defaults"] = {"allow_dtype_change": True}
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    from_yaml = pipeline.load_manifest(tmp_path / "fleet.yaml")
    assert from_yaml == pipeline.load_manifest(write_manifest(tmp_path, doc))
    assert len(from_yaml) == 5 and all(j.allow_dtype_change for j in from_yaml)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(jobz=[]), "unknown key 'jobz'"),
        (lambda m: m["grid"].pop("bases"), "grid: missing 'bases'"),
        (lambda m: m["grid"].update(output="out/{base}.safetensors"), "needs {base} and"),
        (lambda m: m["grid"].update(output="out/{base}-{signatures}-{x}"), "field {x}"),
        (lambda m: m["grid"].update(alphas=["strong"]), "not a number"),
        (lambda m: m["grid"].update(alphas=[[1, 2, 3]]), "job m0/fog/1-2-3: 1 signatures but 3"),
        (lambda m: m.update(jobs=[{"base": "m0.safetensors", "output": "o"}]), "missing 'sig"),
        (
            lambda m: m.update(
                jobs=[
                    {
                        "base": "m0.safetensors",
                        "signatures": ["fog.rws"],
                        "output": "m1.safetensors",
                    }
                ]
            ),  # fmt: skip
            "writes .*m1.safetensors, an input of the run",
        ),
        (lambda m: m["grid"].update(alphas=[0.5, 0.50]), "both write"),
        (lambda m: m["grid"].update(alphas=[float("nan")]), "job m0/fog/nan: alpha nan is not"),
        (
            lambda m: m.update(
                jobs=[{"base": "m0.safetensors", "signatures": "fog.rws", "output": "fleet.json"}]
            ),
            "writes .*fleet.json, an input of the run",  # the manifest itself
        ),
        (
            lambda m: m.update(
                jobs=[
                    {"base": "m0.safetensors", "signatures": "fog.rws", "output": "a"},
                    {"base": "m1.safetensors", "signatures": "fog.rws", "output": "a.rpundo"},
                ]
            ),
            "jobs #1 and #2 both write .*a.rpundo",  # the first job's undo record
        ),
        (
            lambda m: m["grid"].update(output="o/{base}-{signatures}-{alpha:d}"),
            "field {alpha} takes no format spec",
        ),
        (lambda m: m.update(defaults={"undo": "yes"}), "undo must be true or false"),
        (lambda m: (m.pop("grid"), m.update(jobs=[])), "no jobs: 'jobs' is empty"),
        (lambda m: m.update(version=True), "unknown manifest version"),
        (lambda m: m["grid"].update(alphas=["1e-3"]), r"YAML reads 1e-3 as text: write 0\.001"),
    ],
)
def test_bad_manifests_are_refused_with_one_line_naming_the_manifest(tmp_path, edit, match):
    doc = make_fleet(tmp_path)
    edit(doc)
    path = write_manifest(tmp_path, doc)
    with pytest.raises(InvalidArgumentError, match=match) as info:
        pipeline.load_manifest(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, text",
    [
        ("m.json", '{"jobs": [{"base": "a", "base": "b", "signatures": ["s"], "output": "o"}]}'),
        ("m.yaml", "jobs:\n  - {base: a, base: b, signatures: [s], output: o}\n"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, name, text):
    # the last one won: a job built from another base than the first line says
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    with pytest.raises(InvalidArgumentError, match="key 'base' given twice"):
        pipeline.load_manifest(tmp_path / name)


@pytest.mark.parametrize("name", ["fleet.json", "fleet.yaml"])
def test_a_manifest_nested_too_deeply_is_a_one_line_error(tmp_path, name):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text("[" * 100_000)
    with pytest.raises(FormatError, match="nested too deeply|not valid"):
        pipeline.load_manifest(path)


# ---------------------------------------------------------------------------- running


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_builds_what_apply_file_builds_and_reports_a_line_per_job(tmp_path, workers):
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    seen = []
    lines = pipeline.run(jobs, workers=workers, on_result=seen.append)
    assert sorted(ln["job"] for ln in seen) == list(range(4)) and lines == sorted(
        seen, key=lambda ln: ln["job"]
    )
    scratch = tmp_path / "ref"
    scratch.mkdir()
    for job, line in zip(jobs, lines):
        assert line["status"] == "done" and line["output"] == job.output
        assert line["sha256"] == sha(Path(job.output)) == reference(job, scratch)
        assert line["bytes"] == os.path.getsize(job.output) and line["seconds"] > 0
        assert pipeline.verified(job, job_key(job)) is not None


def test_a_failing_job_is_reported_and_the_others_finish(tmp_path, capsys):
    doc = make_fleet(tmp_path)
    doc["grid"]["signatures"]["bad"] = ["missing.rws"]
    path = write_manifest(tmp_path, doc)
    assert main(["batch", str(path), "--workers", "2", "-q"]) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(ln) for ln in out.splitlines()]
    assert len(lines) == 6
    failed = [ln for ln in lines if ln["status"] == "failed"]
    assert len(failed) == 2 and all("missing.rws: No such file" in ln["error"] for ln in failed)
    assert all(Path(ln["output"]).exists() for ln in lines if ln["status"] == "done")
    assert err.strip() == "robustpatch: batch: 6 jobs: 4 done, 0 skipped, 2 failed"


def test_a_job_that_fails_before_writing_leaves_no_marker_and_no_folder(tmp_path):
    """A failed build undoes its claim: no done-marker (one left behind would later
    stand in for overwrite), no folder made for it; an output that was there stays,
    still refused without overwrite."""
    make_fleet(tmp_path)
    (tmp_path / "bad.rws").write_bytes(b"not a signature")
    (tmp_path / "taken.safetensors").write_bytes(b"someone else's file")
    before = {p.name for p in tmp_path.iterdir()}
    jobs = [
        pipeline.Job.make(tmp_path / "m0.safetensors", [tmp_path / "bad.rws"], 1.0, out)
        for out in (tmp_path / "new" / "deeper" / "p.safetensors", tmp_path / "q.safetensors")
    ]
    jobs.append(
        pipeline.Job.make(
            tmp_path / "m0.safetensors",
            [tmp_path / "bad.rws"],
            1.0,
            tmp_path / "taken.safetensors",
            overwrite=True,
        )
    )
    assert [ln["status"] for ln in pipeline.run(jobs, workers=1)] == ["failed"] * 3
    assert {p.name for p in tmp_path.iterdir()} == before
    assert (tmp_path / "taken.safetensors").read_bytes() == b"someone else's file"
    good = pipeline.Job.make(
        tmp_path / "m0.safetensors", [tmp_path / "fog.rws"], 1.0, tmp_path / "taken.safetensors"
    )
    (line,) = pipeline.run([good], workers=1)
    assert line["status"] == "failed" and "no batch run wrote it" in line["error"]


def test_an_output_inside_a_sharded_jobs_output_folder_is_refused(tmp_path):
    from test_sharded import write_sharded

    make_fleet(tmp_path)
    write_sharded(tmp_path / "base")
    doc = {
        "jobs": [
            {"base": "base", "signatures": ["fog.rws"], "output": "O"},
            {"base": "m0.safetensors", "signatures": ["fog.rws"], "output": "O/x.safetensors"},
        ]
    }
    with pytest.raises(InvalidArgumentError, match="inside job #1's output folder"):
        pipeline.load_manifest(write_manifest(tmp_path, doc))
    doc["jobs"] = [{"base": "m0.safetensors", "signatures": ["fog.rws"], "output": " "}]
    with pytest.raises(InvalidArgumentError, match="'output' must be a path"):
        pipeline.load_manifest(write_manifest(tmp_path, doc))


def test_a_rerun_skips_verified_outputs_and_rebuilds_the_rest(tmp_path):
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    first = pipeline.run(jobs, workers=1)
    stamps = {j.output: os.stat(j.output).st_mtime_ns for j in jobs}
    corrupt, unmarked, changed = jobs[0], jobs[1], jobs[2]
    with open(corrupt.output, "r+b") as f:  # one flipped byte, same size
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    pipeline.done_path_for(unmarked.output).unlink()  # as if no batch run wrote it
    changed = pipeline.Job.make(changed.base, changed.signatures, 0.75, changed.output)
    again = pipeline.run([corrupt, unmarked, changed, jobs[3]], workers=1)
    assert [ln["status"] for ln in again] == ["done", "failed", "done", "skipped"]
    assert again[0]["sha256"] == first[0]["sha256"]  # the corrupt output rebuilt
    assert "no batch run wrote it" in again[1]["error"]  # refused, left as it was
    assert os.stat(unmarked.output).st_mtime_ns == stamps[unmarked.output]
    assert again[2]["sha256"] != first[2]["sha256"]  # the new alpha applied
    assert os.stat(jobs[3].output).st_mtime_ns == stamps[jobs[3].output]
    assert again[3]["sha256"] == first[3]["sha256"]
    forced = pipeline.run([replace(unmarked, overwrite=True)], workers=1)
    assert forced[0]["status"] == "done" and forced[0]["sha256"] == first[1]["sha256"]


def test_a_sharded_base_is_a_job_like_any_other(tmp_path):
    from test_sharded import INDEX, signature, write_sharded

    write_sharded(tmp_path / "base")
    signature().save(tmp_path / "fog.rws")
    doc = {"jobs": [{"base": "base", "signatures": ["fog.rws"], "output": "out/p"}]}
    (line,) = pipeline.run(pipeline.load_manifest(write_manifest(tmp_path, doc)), workers=1)
    assert line["status"] == "done" and (tmp_path / "out" / "p" / INDEX).exists()
    assert line["sha256"] == pipeline.output_digest(tmp_path / "out" / "p")[0]
    (again,) = pipeline.run(pipeline.load_manifest(tmp_path / "fleet.json"), workers=1)
    assert again["status"] == "skipped"


def test_a_signature_changed_with_its_size_and_time_kept_is_rebuilt(tmp_path):
    # the key was (path, size, mtime): a re-pointed link or a `cp -p` over it was "skipped"
    make_fleet(tmp_path, bases=1)
    for rel in ("rel1", "rel2"):
        (tmp_path / rel).mkdir()
    os.rename(tmp_path / "fog.rws", tmp_path / "rel1" / "sig.rws")
    os.rename(tmp_path / "snow.rws", tmp_path / "rel2" / "sig.rws")
    for rel in ("rel1", "rel2"):
        os.utime(tmp_path / rel / "sig.rws", ns=(10**9, 10**9))
    (tmp_path / "current.rws").symlink_to("rel1/sig.rws")
    job_doc = {"base": "m0.safetensors", "signatures": ["current.rws"], "output": "o.safetensors"}
    manifest = write_manifest(tmp_path, {"jobs": [job_doc]})
    (first,) = pipeline.run(pipeline.load_manifest(manifest), workers=1)
    (tmp_path / "current.rws").unlink()
    (tmp_path / "current.rws").symlink_to("rel2/sig.rws")  # a new release, same size and time
    (job,) = pipeline.load_manifest(manifest)
    (second,) = pipeline.run([job], workers=1)
    assert second["status"] == "done" and second["sha256"] == reference(job, tmp_path)
    assert second["sha256"] != first["sha256"]
    target = tmp_path / "rel2" / "sig.rws"  # rewritten in place, size and time kept
    target.write_bytes((tmp_path / "rel1" / "sig.rws").read_bytes())
    os.utime(target, ns=(10**9, 10**9))
    (third,) = pipeline.run([job], workers=1)
    assert third["status"] == "done" and third["sha256"] == first["sha256"]


def _sharded_job(d: Path) -> list[pipeline.Job]:
    from test_sharded import signature, write_sharded

    write_sharded(d / "base")
    signature().save(d / "fog.rws")
    doc = {"jobs": [{"base": "base", "signatures": ["fog.rws"], "output": "out/p"}]}
    return pipeline.load_manifest(write_manifest(d, doc))


def test_files_added_beside_a_sharded_output_keep_it_verified(tmp_path):
    # README says to copy config.json into the output: the job then failed on every run
    jobs = _sharded_job(tmp_path)
    (first,) = pipeline.run(jobs, workers=1)
    (tmp_path / "out" / "p" / "config.json").write_text("{}")
    (again,) = pipeline.run(jobs, workers=1)
    assert again["status"] == "skipped" and again["sha256"] == first["sha256"]


@pytest.mark.parametrize("damage", ["shard gone", "index cut", "index gone"])
def test_a_damaged_sharded_output_of_the_batch_is_rebuilt(tmp_path, damage):
    # the writer replaces only a whole checkpoint: the job failed on every run
    from test_sharded import INDEX, shard_name

    jobs = _sharded_job(tmp_path)
    (first,) = pipeline.run(jobs, workers=1)
    out = tmp_path / "out" / "p"
    if damage == "shard gone":
        (out / shard_name(0)).unlink()
    elif damage == "index cut":
        os.truncate(out / INDEX, 10)
    else:
        (out / INDEX).unlink()
    (again,) = pipeline.run(jobs, workers=1)
    assert again["status"] == "done" and again["sha256"] == first["sha256"]
    (out / "notes.txt").write_text("mine")  # a file the marker does not list: left alone
    os.truncate(out / INDEX, 10)
    (third,) = pipeline.run(jobs, workers=1)
    assert third["status"] == "failed" and (out / "notes.txt").read_text() == "mine"


def test_a_sharded_base_whose_shards_are_not_named_safetensors_is_keyed_by_its_index(tmp_path):
    # the key globbed *.safetensors: a changed shard of another name was not seen
    from test_sharded import INDEX, shard_name

    jobs = _sharded_job(tmp_path)
    index = json.loads((tmp_path / "base" / INDEX).read_text())
    for k in range(3):
        os.rename(tmp_path / "base" / shard_name(k), tmp_path / "base" / f"shard{k}.st")
    index["weight_map"] = {n: f"shard{int(f[6:11]) - 1}.st" for n, f in index["weight_map"].items()}
    (tmp_path / "base" / INDEX).write_text(json.dumps(index))
    key = job_key(jobs[0])
    shard = tmp_path / "base" / "shard1.st"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(10**9, 10**9))  # surely another time than it had
    assert job_key(jobs[0]) != key


def test_a_sharded_base_with_a_file_output_is_refused_before_any_job_runs(tmp_path):
    # README's grid did this: the file jobs ran, then each sharded one failed on its own
    from test_sharded import signature, write_sharded

    write_sharded(tmp_path / "base")
    signature().save(tmp_path / "fog.rws")
    grid = {"bases": {"b": "base"}, "signatures": {"fog": ["fog.rws"]}}
    doc = {"grid": dict(grid, output="out/{base}-{signatures}.safetensors")}
    with pytest.raises(InvalidArgumentError, match=r"job #1: its base .*base is a sharded"):
        pipeline.load_manifest(write_manifest(tmp_path, doc))
    assert not (tmp_path / "out").exists()


def test_a_sharded_output_folder_that_holds_an_input_of_the_run_is_refused(tmp_path):
    # the job replaced its folder whole, deleting the manifest or another job's signature
    from test_sharded import shard_name, signature, write_sharded

    write_sharded(tmp_path / "base")
    signature().save(tmp_path / "fog.rws")
    (tmp_path / "out").mkdir()
    signature(2).save(tmp_path / "out" / "keep.rws")
    write_tensors(tmp_path / "m.safetensors", read_tensors(tmp_path / "base" / shard_name(0))[1])
    jobs = [
        {"base": "base", "signatures": ["fog.rws"], "output": "out"},
        {"base": "m.safetensors", "signatures": ["out/keep.rws"], "output": "m2.safetensors"},
    ]
    before = listing(tmp_path)
    with pytest.raises(InvalidArgumentError, match=r"job #1 writes the folder .*keep\.rws"):
        pipeline.load_manifest(write_manifest(tmp_path, {"jobs": jobs}))
    inside = write_manifest(
        tmp_path / "out",
        {"jobs": [dict(jobs[0], base="../base", signatures=["../fog.rws"], output=".")]},
    )
    with pytest.raises(InvalidArgumentError, match=r"holds .*fleet\.json, an input of the run"):
        pipeline.load_manifest(inside)
    (tmp_path / "fleet.json").unlink()
    (tmp_path / "out" / "fleet.json").unlink()
    assert listing(tmp_path) == before


def test_ray_address_without_the_ray_executor_is_refused(tmp_path, capsys):
    path = write_manifest(tmp_path, make_fleet(tmp_path))
    line = usage_error(capsys, "batch", path, "--ray-address", "auto")
    assert line == "robustpatch batch: error: --ray-address needs --executor ray"
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- SIGKILL


def start_batch(manifest: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "robustpatch.cli", "-q", "batch", str(manifest), "--workers", "2"]
    return subprocess.Popen(
        argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )


def line_times(manifest: Path) -> tuple[float, float]:
    """Seconds after the start at which an uninterrupted run printed its first and its
    last result line."""
    t0 = time.perf_counter()
    proc = start_batch(manifest)
    times = [time.perf_counter() - t0 for _ in proc.stdout]
    assert proc.wait() == 0 and len(times) == 8, proc.stderr.read()
    return times[0], times[-1]


def test_sigkill_at_a_random_moment_then_rerun_completes_without_rebuilding(tmp_path):
    """The whole process group (driver and workers) is killed at a random moment; the
    re-run leaves every output complete and verified and rebuilds none that was."""
    doc = make_fleet(tmp_path, bases=4, rows=4096)  # 8 jobs of 4 MiB models
    manifest = write_manifest(tmp_path, doc)
    jobs = pipeline.load_manifest(manifest)
    scratch = tmp_path / "ref"
    scratch.mkdir()
    expected = {j.output: reference(j, scratch) for j in jobs}
    first, last = line_times(manifest)  # when the first and the last job ended
    gap = (last - first) / (len(jobs) - 1)  # between two jobs' ends

    rng = np.random.default_rng(19)
    mid_run = 0
    for trial in range(10):
        if trial >= 3 and mid_run >= 2:
            break
        for j in jobs:
            for p in (
                Path(j.output),
                rp.files.undo_path_for(j.output),
                pipeline.done_path_for(j.output),
            ):
                p.unlink(missing_ok=True)
        proc = start_batch(manifest)
        if trial % 3 == 0:  # anywhere in the run
            after, delay = 0, rng.uniform(0, last)
        else:  # while jobs end: after some result lines and a random part of a job's time
            after, delay = int(rng.integers(1, len(jobs))), rng.uniform(0, gap)
        for _ in range(after):
            proc.stdout.readline()
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        complete = {j.output: os.stat(j.output) for j in jobs if pipeline.verified(j, job_key(j))}
        mid_run += 0 < len(complete) < len(jobs)

        lines = pipeline.run(jobs, workers=2)
        where = f"trial {trial}: killed {delay:.3f} s after result line {after}"
        for job, line in zip(jobs, lines):
            assert line["sha256"] == expected[job.output] == sha(Path(job.output)), where
            assert pipeline.verified(job, job_key(job)) is not None, where
            if job.output in complete:
                assert line["status"] == "skipped", where
                st = os.stat(job.output)
                assert (st.st_ino, st.st_mtime_ns) == (
                    complete[job.output].st_ino,
                    complete[job.output].st_mtime_ns,
                ), where
            else:
                assert line["status"] == "done", where
    assert mid_run >= 1  # at least one kill landed with some outputs done, some not


# ---------------------------------------------------------------------------- Ray


def test_a_malformed_ray_address_is_one_error_line(tmp_path):
    # it was a ValueError traceback from ray.init
    pytest.importorskip("ray")
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    with pytest.raises(InvalidArgumentError, match="cannot start or reach Ray at 'not an address'"):
        pipeline.run(jobs, executor="ray", ray_address="not an address")
    assert not (tmp_path / "out").exists()


def test_a_ray_address_nothing_answers_at_is_refused_at_once(tmp_path, capsys):
    # ray.init retried it for minutes, a warning every few seconds
    pytest.importorskip("ray")
    import socket

    with socket.socket() as free:  # a port nothing listens on
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    path = write_manifest(tmp_path, make_fleet(tmp_path))
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        started = time.monotonic()
        assert main(["batch", str(path), "--executor", "ray", "--ray-address", address]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"robustpatch: error: cannot reach the Ray cluster at '{address}'")
        assert len(err.splitlines()) == 1 and time.monotonic() - started < 30
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_tasks_give_the_same_outputs_and_follow_the_same_resume_rules(tmp_path, ray_local):
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    on_ray = pipeline.run(jobs, executor="ray")
    assert [ln["status"] for ln in on_ray] == ["done"] * 4
    local_dir = tmp_path / "local"
    local_jobs = [
        pipeline.Job.make(j.base, j.signatures, j.alphas, local_dir / Path(j.output).name)
        for j in jobs
    ]
    local = pipeline.run(local_jobs, workers=1)
    assert [ln["sha256"] for ln in on_ray] == [ln["sha256"] for ln in local]
    assert set(on_ray[0]) == set(local[0])  # the same fields in a line
    again = pipeline.run(jobs, executor="ray")
    assert [ln["status"] for ln in again] == ["skipped"] * 4


def test_a_failing_ray_task_is_reported_and_the_others_finish(tmp_path, ray_local):
    doc = make_fleet(tmp_path)
    doc["grid"]["signatures"]["bad"] = ["missing.rws"]
    lines = pipeline.run(pipeline.load_manifest(write_manifest(tmp_path, doc)), executor="ray")
    assert [ln["status"] for ln in lines].count("failed") == 2
    assert [ln["status"] for ln in lines].count("done") == 4


def test_a_ray_address_is_refused_when_this_process_is_connected_to_a_cluster(tmp_path, ray_local):
    # the address was ignored: the jobs ran on the cluster of the live connection
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    with pytest.raises(InvalidArgumentError, match="already initialized"):
        pipeline.run(jobs, executor="ray", ray_address="ray://elsewhere:10001")
    assert not (tmp_path / "out").exists()


def test_the_ray_executor_without_ray_says_which_extra_to_install(tmp_path, monkeypatch):
    jobs = pipeline.load_manifest(write_manifest(tmp_path, make_fleet(tmp_path)))
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(InvalidArgumentError, match=r"pip install 'robustpatch\[ray\]'"):
        pipeline.run(jobs, executor="ray")
    assert not (tmp_path / "out").exists()


def test_a_killed_worker_fails_only_its_own_job(monkeypatch):
    # a dead worker broke the pool and every job still queued or running was reported
    # failed, a complete one among them
    from robustpatch.pipeline import runner
    from rp_testutil import FakeJob, fake_run_job

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    jobs = [FakeJob(f"ok{i}") for i in range(6)]
    jobs[2] = FakeJob("kill2")
    lines: list[dict] = []
    runner._run_local(jobs, 2, lines.append)
    status = {line["job"]: line["status"] for line in lines}
    assert sorted(status) == list(range(6))
    assert [i for i, s in status.items() if s != "done"] == [2]
    assert "BrokenProcessPool" in next(line["error"] for line in lines if line["job"] == 2)


def test_ctrl_c_stops_a_pool_run_without_building_the_queue(monkeypatch, tmp_path):
    # the pool went on building every queued job before the interrupt got through
    from robustpatch.pipeline import runner
    from rp_testutil import FakeJob, fake_run_job

    monkeypatch.setattr(runner, "run_job", fake_run_job)
    jobs = [FakeJob(str(tmp_path / f"ok{i}")) for i in range(40)]

    def interrupt(line: dict) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        runner._run_local(jobs, 2, interrupt)
    built = len(list(tmp_path.iterdir()))
    assert built <= 8, f"{built} of 40 jobs ran after Ctrl-C"  # the running and the handed-out


def test_an_empty_batch_on_a_pool_reports_no_jobs(capsys, tmp_path):
    # min(workers, 0) processes: a ValueError traceback
    assert pipeline.run([], workers=2) == []
    manifest = tmp_path / "fleet.json"
    manifest.write_text('{"jobs": []}')  # a manifest that runs nothing is a mistake in it
    assert main(["batch", str(manifest), "--workers", "2"]) == 1
    assert "no jobs: 'jobs' is empty" in capsys.readouterr().err


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux's")
def test_the_default_worker_count_follows_the_cpus_this_process_may_use():
    # os.cpu_count() counts the host's CPUs: 64 processes in a container limited to 2
    from robustpatch.pipeline.runner import usable_cpus

    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cpus() == len(allowed)


def test_an_output_under_a_file_is_not_a_directory(tmp_path):
    # "m0.safetensors: File exists" for out/m0.safetensors/a.safetensors
    make_fleet(tmp_path, bases=1)
    doc = {"jobs": [{"base": "m0.safetensors", "signatures": ["fog.rws"], "output": "x/a"}]}
    (tmp_path / "x").write_text("a file")
    (line,) = pipeline.run(pipeline.load_manifest(write_manifest(tmp_path, doc)), workers=1)
    assert line["status"] == "failed" and "Not a directory" in line["error"]
