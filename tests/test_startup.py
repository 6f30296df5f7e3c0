"""What a process pays before any work: ``import robustpatch`` loads neither numpy nor
the package's modules, a public name loads its module on first use, and the command line
chooses numpy's BLAS threads before numpy loads and imports tqdm only to show a bar."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

import robustpatch as rp


def _child(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (without OPENBLAS_NUM_THREADS unless given);
    it prints one JSON object, returned here."""
    child_env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    child_env.update(env)
    out = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_importing_the_package_loads_neither_numpy_nor_its_modules():
    got = _child(
        "import json, sys, robustpatch\n"
        "print(json.dumps(sorted(m for m in sys.modules"
        " if m == 'numpy' or m.startswith('robustpatch'))))"
    )
    assert "numpy" not in got
    assert set(got) == {"robustpatch", "robustpatch._core", "robustpatch.errors"}


@pytest.mark.parametrize("name", rp.__all__)
def test_every_public_name_resolves(name):
    assert getattr(rp, name) is not None


def test_names_are_listed_before_use_and_submodules_load_when_named():
    got = _child(
        "import json, robustpatch as rp\n"
        "listed = 'extract' in dir(rp) and 'Signature' in dir(rp)\n"
        "print(json.dumps([listed, rp.files.__name__, rp.signature.Signature is rp.Signature]))"
    )
    assert got == [True, "robustpatch.files", True]


def test_extract_stays_the_function_after_its_module_is_imported():
    got = _child(
        "import json, robustpatch as rp, robustpatch.extraction as m\n"
        "print(json.dumps([callable(rp.extract), rp.extract is m.extract]))"
    )
    assert got == [True, True]


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = rp.nope


BLAS_PROBE = (
    "import json, os, sys\n"
    "from robustpatch.cli import main\n"
    "sys.argv[1:] = ARGV\n"
    "try:\n"
    "    main()\n"
    "except SystemExit:\n"
    "    pass\n"
    "print(json.dumps([os.environ.get('OPENBLAS_NUM_THREADS'), 'tqdm' in sys.modules]))"
)


@pytest.fixture
def model_and_signature(tmp_path):
    rng = np.random.default_rng(0)
    pre = {"w": rng.normal(size=(64, 32)).astype(np.float32)}
    save_file(pre, str(tmp_path / "m.safetensors"))
    sig = rp.extract(pre, pre, {"w": pre["w"] + np.float32(0.1)}, layers="all")
    sig.save(tmp_path / "s.rws")
    return tmp_path / "m.safetensors", tmp_path / "s.rws"


def _cli_child(*argv, **env) -> list:
    code = BLAS_PROBE.replace("ARGV", repr([str(a) for a in argv]))
    return _child(code, **env)


def test_commands_without_blas_work_run_numpy_single_threaded(model_and_signature, tmp_path):
    model, sig = model_and_signature
    threads, tqdm_loaded = _cli_child("-q", "apply", model, sig, "-o", tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").exists()
    assert threads == "1"
    assert tqdm_loaded is False  # a hidden bar does not import tqdm


def test_similarity_keeps_blas_threads_and_a_users_choice_is_kept(model_and_signature):
    _, sig = model_and_signature
    assert _cli_child("similarity", sig, sig)[0] is None
    assert _cli_child("inspect", sig, OPENBLAS_NUM_THREADS="3")[0] == "3"


def test_main_called_with_arguments_leaves_the_callers_environment(model_and_signature):
    _, sig = model_and_signature
    code = BLAS_PROBE.replace("sys.argv[1:] = ARGV\n", "").replace(
        "main()", f"main(['inspect', {str(sig)!r}])"
    )
    assert _child(code)[0] is None


def test_python_dash_m_robustpatch_is_the_command():
    out = subprocess.run(
        [sys.executable, "-m", "robustpatch", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"robustpatch {rp.__version__}"
