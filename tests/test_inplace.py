"""In-place patching of a mapped model (``apply_file(..., inplace=True)``, ``--inplace``):
the same tensor bytes as an output file, exact removal in place, only the touched bytes
written, refusals that leave every file as it was, the journal's recovery in each
state, and SIGKILL at random moments (the model is always the original or the patched
one once recovered)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from robustpatch._format.safetensors import TensorInfo, encode_header, read_header, write_tensors
from robustpatch._format.undo import UNDO_KEY
from robustpatch._io.journal import Journal, journal_path_for, recover
from robustpatch.cli import main
from robustpatch.errors import FormatError, InvalidArgumentError, MismatchError, NonFiniteError
from robustpatch.files import apply_file, remove_file, undo_path_for
from robustpatch.inplace import PENDING_SUFFIX
from robustpatch.signature import Signature
from rp_testutil import listing, sha

pytestmark = pytest.mark.skipif(os.name != "posix", reason="mmap sharing and SIGKILL are POSIX")

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def write_model(path: Path, n: int, shape=(64, 64), pad: int = 0, seed: int = 0) -> list:
    """``n`` tensors (every third BF16, the rest F32); ``pad`` spaces of room in the header."""
    rng = np.random.default_rng(seed)
    infos, blobs, offset = [], [], 0
    for i in range(n):
        x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        if i % 3 == 2:
            x, label = (x.view(np.uint32) >> 16).astype(np.uint16), "BF16"
        else:
            label = "F32"
        infos.append(TensorInfo(f"layers.{i}.weight", label, shape, offset, offset + x.nbytes))
        blobs.append(x.tobytes())
        offset += x.nbytes
    head = encode_header(infos, {"format": "pt"})
    text = head[8:] + b" " * pad
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))
    return infos


def write_signature(path: Path, infos: list, every: int, bits: int | None = 4, seed=1) -> None:
    rng = np.random.default_rng(seed)
    chosen = infos[::every]
    deltas = {t.name: rng.normal(0, 1e-3, t.shape).astype(np.float32) for t in chosen}
    sig = Signature.from_deltas(deltas, dtypes={t.name: t.dtype for t in chosen}, name="ip")
    (sig.quantize(bits, "affine", "group", 64) if bits else sig).save(path)


def data(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[8 + int.from_bytes(raw[:8], "little") :]


@pytest.fixture
def small(tmp_path):
    infos = write_model(tmp_path / "m.safetensors", 9)
    write_signature(tmp_path / "s.rws", infos, every=2)
    return tmp_path


def test_inplace_gives_the_output_files_tensor_bytes_and_removal_restores_every_bit(small):
    model, sig = small / "m.safetensors", small / "s.rws"
    original = sha(model)
    ref = apply_file(model, sig, 0.7, small / "ref.safetensors")
    rep = apply_file(model, sig, 0.7, inplace=True)
    assert data(model) == data(ref.out)
    assert rep.undo == undo_path_for(model) and rep.undo.exists()
    assert rep.bytes_written == sum(t.nbytes for t in read_header(model).tensors[::2])
    assert not rep.header_updated  # the written header had no room
    remove_file(model, inplace=True)
    assert sha(model) == original
    assert sorted(listing(small)) == [
        "m.safetensors",
        "ref.safetensors",
        "ref.safetensors.rpundo",
        "s.rws",
    ]


def test_header_with_room_records_the_applied_signature_and_is_restored(tmp_path):
    model, sig = tmp_path / "m.safetensors", tmp_path / "s.rws"
    write_signature(sig, write_model(model, 6, pad=512), every=3)
    original = sha(model)
    start = read_header(model).data_start
    rep = apply_file(model, sig, 1.0, inplace=True)
    assert rep.header_updated
    header = read_header(model)
    assert header.data_start == start  # the data did not move
    assert '"hash"' in header.metadata["robustpatch.applied"]
    assert main(["remove", str(model), "--inplace", "-q"]) == 0
    assert sha(model) == original and not undo_path_for(model).exists()


def test_only_the_touched_bytes_are_written(tmp_path):
    """A 1 GiB tensor left as a hole in a sparse file stays a hole: in place, the
    untouched bytes are never read into memory or written."""
    model, sig = tmp_path / "m.safetensors", tmp_path / "s.rws"
    small = TensorInfo("small", "F32", (256, 256), 0, 256 * 256 * 4)
    huge = TensorInfo("huge", "F32", (1 << 28,), small.end, small.end + (1 << 30))
    head = encode_header([small, huge], {})
    with open(model, "wb") as f:
        f.write(head + np.ones(256 * 256, np.float32).tobytes())
        f.truncate(len(head) + huge.end)
    Signature.from_deltas({"small": np.full((256, 256), 0.5, np.float32)}, name="s").save(sig)
    before = os.stat(model).st_blocks
    apply_file(model, sig, 1.0, inplace=True)
    assert os.stat(model).st_blocks - before < (4 << 20) // 512
    raw = np.fromfile(model, np.float32, 256 * 256, offset=len(head))
    assert (raw == 1.5).all()


def test_refusals_leave_every_file_as_it_was(small):
    model, sig = small / "m.safetensors", small / "s.rws"
    before = listing(small)
    with pytest.raises(InvalidArgumentError, match="leave out the output"):
        apply_file(model, sig, 1.0, small / "x.safetensors", inplace=True)
    with pytest.raises(InvalidArgumentError, match="is the input"):
        apply_file(sig, sig, 1.0, inplace=True)  # the model is one of the signatures
    os.link(model, small / "alias.safetensors")
    with pytest.raises(InvalidArgumentError, match="2 hard links"):
        apply_file(model, sig, 1.0, inplace=True)
    os.unlink(small / "alias.safetensors")
    undo_path_for(model).write_bytes(b"an earlier patch's record")
    with pytest.raises(FileExistsError, match="already carries a patch"):
        apply_file(model, sig, 1.0, inplace=True)
    undo_path_for(model).unlink()
    assert listing(small) == before


def test_an_overflow_is_rolled_back_from_the_journal(small):
    model, infos = small / "m.safetensors", read_header(small / "m.safetensors").tensors
    big = Signature.from_deltas({infos[0].name: np.full((64, 64), 3e38, np.float32)}, name="b")
    big.save(small / "big.rws")
    before = listing(small)
    with pytest.raises(NonFiniteError):
        apply_file(model, small / "big.rws", 2.0, inplace=True)
    assert listing(small) == before


def test_remove_in_place_refuses_a_record_whose_header_had_another_length(small):
    model, sig = small / "m.safetensors", small / "s.rws"
    apply_file(model, sig, 1.0, small / "p.safetensors")  # the header grew
    before = listing(small)
    with pytest.raises(InvalidArgumentError, match="another length"):
        remove_file(small / "p.safetensors", inplace=True)
    assert listing(small) == before


def test_a_model_with_an_interrupted_patch_is_refused_until_recovered(small, capsys):
    model, sig = small / "m.safetensors", small / "s.rws"
    journal_path_for(model).write_bytes(b"RPJRNL1\n-")  # never sealed
    with pytest.raises(FormatError, match="robustpatch recover"):
        apply_file(model, sig, 1.0, small / "out.safetensors")
    assert main(["inspect", str(model)]) == 1
    assert "was interrupted" in capsys.readouterr().err
    assert recover(model) == "discarded" and not journal_path_for(model).exists()


def test_a_file_with_an_interrupted_patch_is_never_written_over(small):
    # a new file written there was later "recovered": the journal's bytes written into it
    model, sig = small / "m.safetensors", small / "s.rws"
    apply_file(model, sig, 1.0, small / "p.safetensors")
    journal_path_for(model).write_bytes(b"RPJRNL2\nP")
    before = listing(small)
    with pytest.raises(FormatError, match="robustpatch recover"):
        apply_file(small / "p.safetensors", sig, 1.0, model)
    with pytest.raises(FormatError, match="robustpatch recover"):
        remove_file(small / "p.safetensors", model)
    assert listing(small) == before


def test_recovery_rolls_a_pending_journal_back_and_a_done_one_forward(small):
    model = small / "m.safetensors"
    original = model.read_bytes()
    ranges = [(100, 64), (4000, 1000)]
    with open(model, "r+b") as f:
        Journal.begin(model, f.fileno(), ranges)
        for offset, length in ranges:
            os.pwrite(f.fileno(), b"\xff" * length, offset)  # killed mid-patch
    assert recover(model) == "rolled back"
    assert model.read_bytes() == original and not journal_path_for(model).exists()

    record = small / "r.rpundo"
    pending = Path(str(record) + PENDING_SUFFIX)
    with open(model, "r+b") as f:
        journal = Journal.begin(model, f.fileno(), ranges, commit_rename=(pending, record))
        os.pwrite(f.fileno(), b"\x01" * 64, 100)
    _fake_undo_record(pending)
    written = pending.read_bytes()
    with open(journal.path, "r+b") as j:
        os.pwrite(j.fileno(), b"D", 8)  # committed, killed before the rename
    assert recover(model) == "completed"
    assert record.read_bytes() == written and not pending.exists()
    assert model.read_bytes()[100:164] == b"\x01" * 64
    assert recover(model) is None


def test_recovery_refuses_another_model_of_the_same_size_put_in_its_place(small):
    # the journal's bytes were written into whatever file had the model's name and size:
    # a mix of two models, which a later removal called "restored bit for bit"
    model = small / "m.safetensors"
    data = model.read_bytes()
    ranges = [(100, 64)]
    with open(model, "r+b") as f:
        journal = Journal.begin(model, f.fileno(), ranges)
    other = bytes(data[:200]) + bytes(b ^ 1 for b in data[200:])  # same size, other weights
    model.write_bytes(other)
    kept = journal.path.read_bytes()
    with pytest.raises(MismatchError, match="not the file that the in-place patch"):
        recover(model)
    assert model.read_bytes() == other and journal.path.read_bytes() == kept
    model.write_bytes(bytes(data))  # the model itself back: recovered
    assert recover(model) == "rolled back" and not journal.path.exists()


def test_a_rolled_back_removal_says_the_model_is_still_patched(small, capsys):
    # "restored to the original" was printed with the patched model and its record there
    model, sig = small / "m.safetensors", small / "s.rws"
    apply_file(model, sig, 1.0, inplace=True)
    patched, record = model.read_bytes(), undo_path_for(model)
    with open(model, "r+b") as f:
        header_end = 8 + int.from_bytes(f.read(8), "little")
        Journal.begin(model, f.fileno(), [(0, header_end)], commit_unlink=record)
        os.pwrite(f.fileno(), b" " * 8, header_end - 8)  # killed mid-removal
    assert main(["recover", str(model)]) == 0
    assert "still patched" in capsys.readouterr().out
    assert model.read_bytes() == patched and record.exists()


def test_inspect_lists_what_an_in_place_patch_applied_from_its_record(small, capsys):
    # the header had no room for the list: "no robustpatch signatures applied"
    model, sig = small / "m.safetensors", small / "s.rws"
    rep = apply_file(model, sig, 0.5, inplace=True)
    assert not rep.header_updated
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "alpha=0.5" in out and "(from the undo record)" in out and "no robustpatch" not in out
    remove_file(model, inplace=True)
    undo_path_for(model).write_bytes(b"not a record")  # a stray file of that name
    assert main(["inspect", str(model)]) == 0
    out = capsys.readouterr().out
    assert "no robustpatch signatures applied" in out and "not an undo record" in out


def test_a_journal_killed_before_its_seal_is_discarded_and_the_model_kept(small):
    model = small / "m.safetensors"
    original = model.read_bytes()
    with open(model, "r+b") as f:
        path = Journal.begin(model, f.fileno(), [(100, 64)]).path
    with open(path, "r+b") as j:
        os.pwrite(j.fileno(), b"-", 8)  # whole, but killed before the seal
        os.pwrite(j.fileno(), b"\0" * 32, path.stat().st_size - 32)  # digest not yet on disk
    assert recover(model) == "discarded" and not path.exists()
    assert model.read_bytes() == original


@pytest.mark.parametrize("damage", ["bit", "cut", "digest"])
def test_a_sealed_journal_that_is_damaged_is_refused_and_kept(small, damage, capsys):
    # it was discarded as "never completed", deleting the only copy of the original
    # bytes of a model the interrupted patch had already half changed
    model = small / "m.safetensors"
    with open(model, "r+b") as f:
        path = Journal.begin(model, f.fileno(), [(100, 64), (4000, 1000)]).path
        os.pwrite(f.fileno(), b"\xff" * 64, 100)  # killed mid-patch
    raw = bytearray(path.read_bytes())
    if damage == "bit":
        raw[-100] ^= 1
    elif damage == "cut":
        raw = raw[:-1]
    else:
        raw[-1] ^= 0xFF
    path.write_bytes(raw)
    before = listing(small)
    with pytest.raises(FormatError, match="damaged journal .*only copy of the original bytes"):
        recover(model)
    assert main(["recover", str(model)]) == 1
    assert "damaged journal" in capsys.readouterr().err
    assert listing(small) == before  # journal kept, model not touched


def test_a_journal_written_through_a_symlink_is_found_through_the_real_name(small):
    # it was kept beside the link: a patch through the real name went ahead over a
    # half-patched model, and a later remove "restored" the half-patched bytes. (The
    # undo record stays beside the name given, where every reader looks for it.)
    model, sig, link = small / "m.safetensors", small / "s.rws", small / "link.safetensors"
    link.symlink_to(model.name)
    original = model.read_bytes()
    with open(model, "r+b") as f:
        Journal.begin(link, f.fileno(), [(100, 64)])  # an apply through the link, killed
        os.pwrite(f.fileno(), b"\xff" * 64, 100)
    assert journal_path_for(link) == journal_path_for(model)
    apply_file(model, sig, 1.0, inplace=True)  # recovers first
    assert undo_path_for(model).exists()
    remove_file(model, inplace=True)
    assert model.read_bytes() == original and link.is_symlink()
    assert sorted(p.name for p in small.iterdir()) == ["link.safetensors", "m.safetensors", "s.rws"]


def test_in_place_through_a_symlink_is_refused(small, capsys):
    # the record went beside the link, where a patch through the file's own name did not
    # look: the model was patched twice, and one record's removal left it patched once
    model, sig, link = small / "m.safetensors", small / "s.rws", small / "link.safetensors"
    link.symlink_to(model.name)
    before = listing(small)
    with pytest.raises(InvalidArgumentError, match=r"link.safetensors is a symbolic link"):
        apply_file(link, sig, 1.0, inplace=True)
    assert main(["apply", str(link), str(sig), "--inplace"]) == 1
    assert "patch that file in place by its own name" in capsys.readouterr().err
    apply_file(model, sig, 1.0, inplace=True)
    with pytest.raises(InvalidArgumentError, match="symbolic link"):
        remove_file(link, inplace=True)
    remove_file(model, inplace=True)
    assert listing(small) == before


def _fake_undo_record(path: Path) -> None:
    """A file that reads as an undo record (its key in the header's metadata)."""
    write_tensors(path, {"x": np.zeros(1, np.float32)}, {UNDO_KEY: "{}"})


def _forge(model: Path, plan: dict, state: bytes = b"D") -> Path:
    """A journal of ``plan`` for ``model``, whole and with a valid digest (anyone can
    compute one): only its contents can say it is not robustpatch's."""
    import json

    from robustpatch import _core

    meta = json.dumps({"model_size": model.stat().st_size, "ranges": [], **plan}).encode()
    h = _core.Blake3()
    h.update(np.frombuffer(meta, np.uint8))
    path = journal_path_for(model)
    head = b"RPJRNL2\n" + state + bytes(7) + len(meta).to_bytes(8, "little")
    path.write_bytes(head + meta + bytes.fromhex(h.hexdigest()))
    return path


_NOT_TOUCHING, _DAMAGED = "not an undo record; not touching it", "damaged journal"


@pytest.mark.parametrize(
    ("state", "plan", "refusal"),
    [
        (b"D", {"commit_unlink": "{victim}"}, _NOT_TOUCHING),
        (b"D", {"commit_rename": ["{victim}.pending", "{victim}"]}, _NOT_TOUCHING),
        (b"D", {"commit_rename": ["{victim}", "{other}"]}, _DAMAGED),
        (b"P", {"rollback_unlink": ["{victim}.pending"]}, _NOT_TOUCHING),
        (b"P", {"rollback_unlink": ["{victim}"]}, _DAMAGED),
    ],
    ids=["unlink", "rename-pending", "rename-any", "rollback-pending", "rollback-any"],
)
def test_a_forged_journal_never_deletes_or_moves_a_file_that_is_not_an_undo_record(
    small, state, plan, refusal
):
    model, victim, other = small / "m.safetensors", small / "victim.txt", small / "other.txt"
    victim.write_text("mine")
    Path(f"{victim}.pending").write_text("also mine")
    other.write_text("mine too")
    fill = {"victim": victim, "other": other}
    forged = {
        k: v.format(**fill) if isinstance(v, str) else [x.format(**fill) for x in v]
        for k, v in plan.items()
    }
    before = listing(small)
    path = _forge(model, forged, state)
    with pytest.raises(FormatError, match=refusal):
        recover(model)
    assert path.exists()  # left for the user to look at
    path.unlink()
    assert listing(small) == before


@pytest.mark.parametrize("magic", [b"RPJRNL1\n", b"RPJRNL2\n"])
def test_a_pending_journal_cut_short_is_kept_whatever_release_wrote_it(small, magic):
    # RPJRNL1 is both the sealed journal of the last release (cut short: damaged after the
    # patch began) and the unsealed one of those before (cut short: never followed): no
    # byte tells them apart, so it is kept, and the refusal names both
    model, before = small / "m.safetensors", (small / "m.safetensors").read_bytes()
    path = _forge(model, {"ranges": [[100, 64]]}, b"P")
    whole = path.read_bytes()
    path.write_bytes(magic + whole[len(magic) : -40])  # the last range bytes and digest lost
    with pytest.raises(FormatError, match="damaged journal") as refused:
        recover(model)
    assert ("then the model is untouched" in str(refused.value)) == (magic == b"RPJRNL1\n")
    assert path.exists() and model.read_bytes() == before


@pytest.mark.parametrize(
    "ranges",
    [[[1]], 5, None, [[0, 1, 2]], [["a", 1]], [[-1, 4]], [[True, 1]], [[0, 10**12]]],
)
def test_a_journal_with_malformed_ranges_is_refused_with_a_clear_error(small, ranges):
    model = small / "m.safetensors"
    before = listing(small)
    path = _forge(model, {"ranges": ranges}, b"P")
    with pytest.raises(FormatError, match="damaged journal"):
        recover(model)
    assert path.exists()  # left for the user to look at
    path.unlink()
    assert listing(small) == before


def test_cli_needs_exactly_one_of_output_and_inplace(small, capsys):
    model, sig = str(small / "m.safetensors"), str(small / "s.rws")
    with pytest.raises(SystemExit) as e:
        main(["apply", model, sig])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["apply", model, sig, "--inplace", "-o", str(small / "o.safetensors")])
    assert e.value.code == 2
    assert "either -o/--output or --inplace" in capsys.readouterr().err


# ---------------------------------------------------------------------------- SIGKILL


def _cli(*argv: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "robustpatch.cli", "-q", *map(str, argv)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _journal_lifetime(model: Path, sig: Path) -> float:
    """Seconds the journal of one in-place apply exists."""
    proc, seen = _cli("apply", model, sig, "--inplace"), None
    while proc.poll() is None:
        if seen is None and journal_path_for(model).exists():
            seen = time.perf_counter()
        time.sleep(0.001)
    assert proc.returncode == 0, proc.stderr.read()
    return time.perf_counter() - seen if seen is not None else 0.05


def _kill_at_random(model: Path, sig: Path, rng: random.Random, lifetime: float) -> None:
    """Start an in-place apply and SIGKILL it: one time in five at a random moment
    before its journal appears, else at a random moment of the journal's lifetime
    (measured from its appearance, so a loaded machine's start-up drift cannot move
    every kill out of the window)."""
    proc = _cli("apply", model, sig, "--inplace")
    if rng.random() < 0.2:
        time.sleep(rng.uniform(0, 0.3))
    else:
        while proc.poll() is None and not journal_path_for(model).exists():
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, lifetime))
    proc.kill()
    proc.wait()


def test_sigkill_at_random_moments_leaves_the_original_or_the_patched_model(tmp_path):
    """Kills land at random moments of in-place runs (seeded) until 5 have hit one while
    its journal existed (up to 60 trials): recovery must give the original model (and
    no record) or the patched one with a record that removes it exactly."""
    model, sig = tmp_path / "m.safetensors", tmp_path / "s.rws"
    write_signature(sig, write_model(model, 24, shape=(512, 512)), every=2, bits=None)
    original = sha(model)
    apply_file(model, sig, 1.0, tmp_path / "ref.safetensors")
    patched = data(tmp_path / "ref.safetensors")
    lifetime = _journal_lifetime(model, sig)
    remove_file(model, inplace=True)
    assert sha(model) == original
    rng, mid, outcomes = random.Random(19), 0, set()
    for _ in range(60):
        _kill_at_random(model, sig, rng, lifetime)
        mid += journal_path_for(model).exists()
        outcomes.add(recover(model))
        if undo_path_for(model).exists():
            assert data(model) == patched
            remove_file(model, inplace=True)
        assert sha(model) == original
        assert sorted(p.name for p in tmp_path.iterdir()) == [
            "m.safetensors",
            "ref.safetensors",
            "ref.safetensors.rpundo",
            "s.rws",
        ]
        if mid >= 5:
            break
    assert mid >= 5, f"only {mid} of 60 kills landed while the journal existed"
    assert outcomes & {"rolled back", "discarded"}


def test_a_patch_committed_before_a_kill_is_completed_before_the_record_check(small):
    model, sig = small / "m.safetensors", small / "s.rws"
    apply_file(model, sig, 1.0, inplace=True)
    record = undo_path_for(model)
    pending = Path(str(record) + PENDING_SUFFIX)
    first_record, patched = record.read_bytes(), model.read_bytes()
    record.rename(pending)  # committed (state D), killed before the rename
    with open(model, "r+b") as f:
        journal = Journal.begin(model, f.fileno(), [(100, 64)], commit_rename=(pending, record))
    with open(journal.path, "r+b") as j:
        os.pwrite(j.fileno(), b"D", 8)
    with pytest.raises(FileExistsError, match="already carries a patch"):
        apply_file(model, sig, 0.5, inplace=True)
    assert record.read_bytes() == first_record and model.read_bytes() == patched
    assert not pending.exists() and not journal_path_for(model).exists()


def test_a_committed_patch_is_finished_from_any_working_folder(small, monkeypatch):
    """The journal's file actions name their files from the root: a recovery run from
    another folder puts the record in place (it left it pending and deleted the journal,
    and a later in-place apply patched the model twice)."""
    monkeypatch.chdir(small)
    model, sig = Path("m.safetensors"), Path("s.rws")
    apply_file(model, sig, 1.0, inplace=True)
    record = undo_path_for(model)
    pending = Path(str(record) + PENDING_SUFFIX)
    first_record = record.read_bytes()
    record.rename(pending)  # committed (state D), killed before the rename
    with open(model, "r+b") as f:
        journal = Journal.begin(model, f.fileno(), [(100, 64)], commit_rename=(pending, record))
    with open(journal.path, "r+b") as j:
        os.pwrite(j.fileno(), b"D", 8)
    monkeypatch.chdir(small.parent)
    assert recover(small / model) == "completed"
    assert (small / record).read_bytes() == first_record
    assert not (small / pending).exists() and not journal.path.exists()


def test_a_journal_that_cannot_be_written_is_deleted(small, monkeypatch):
    import robustpatch._io.journal as journal_module
    from robustpatch._io.direct import DirectWriter

    class FullDisk(DirectWriter):
        def copy_from(self, *args, **kwargs):
            self.write(b"\0" * 16)
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module, "DirectWriter", FullDisk)
    model, sig = small / "m.safetensors", small / "s.rws"
    before = listing(small)
    with pytest.raises(OSError, match="No space left"):
        apply_file(model, sig, 1.0, inplace=True)
    assert listing(small) == before


@pytest.mark.parametrize("direct_io", [True, False])
def test_a_journal_spanning_many_write_blocks_rolls_the_model_back(
    tmp_path, monkeypatch, direct_io
):
    """The journal's bytes go through small write blocks (direct I/O, or buffered where
    the filesystem refuses it): unaligned ranges that cross block edges are saved whole
    and hashed whole, so recovery trusts the journal and restores every byte."""
    import robustpatch._io.direct as direct_module
    from robustpatch._io.direct import DirectWriter

    monkeypatch.setattr(direct_module, "DIRECT_BLOCK", 8192)
    if not direct_io:
        monkeypatch.setattr(DirectWriter, "open", classmethod(lambda cls, fd: None))
    model = tmp_path / "m.bin"
    original = np.random.default_rng(5).integers(0, 256, 100_000, dtype=np.uint8).tobytes()
    model.write_bytes(original)
    ranges = [(3, 20_001), (30_000, 4096), (40_123, 50_000)]
    with open(model, "r+b") as f:
        Journal.begin(model, f.fileno(), ranges)
        for offset, length in ranges:
            os.pwrite(f.fileno(), b"\xff" * length, offset)
    assert model.read_bytes() != original
    assert recover(model) == "rolled back"  # the journal's digest checked out
    assert model.read_bytes() == original
    assert not journal_path_for(model).exists()


def test_an_earlier_journal_naming_its_record_from_another_folder_is_kept(small, monkeypatch):
    # its relative record path did not resolve: "completed", the record left pending
    monkeypatch.chdir(small)
    model, sig = Path("m.safetensors"), Path("s.rws")
    apply_file(model, sig, 1.0, inplace=True)
    record = undo_path_for(model)
    pending = Path(str(record) + PENDING_SUFFIX)
    record.rename(pending)
    path = _forge(model, {"commit_rename": [str(pending), str(record)]}, b"D")
    monkeypatch.chdir(small.parent)  # the relative names now point elsewhere
    with pytest.raises(FormatError, match="from the folder the patch ran in"):
        recover(small / model)
    assert path.exists() and (small / pending).exists()
    monkeypatch.chdir(small)
    assert recover(model) == "completed" and record.exists() and not path.exists()
