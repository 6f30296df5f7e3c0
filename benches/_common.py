"""Helpers shared by the file benchmarks (run as scripts, so ``benches/`` is on sys.path)."""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable


def settle() -> None:
    """Start every timed run from the same state: no dirty pages waiting for the disk."""
    if hasattr(os, "sync"):
        os.sync()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            h.update(block)
    return h.hexdigest()


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of a Llama model, in Hugging Face's naming and order."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(hidden: int, inter: int, layers: int, vocab: int) -> dict:
    """The ``config.json`` of that model, as mergekit and transformers read it."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),
        "num_key_value_heads": max(1, hidden // 64),
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def run_measured(argv: list) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of a command. The RSS is GNU time's %M:
    the largest of the command and the children it waited for (a pool's workers). A
    child forked from this process directly would report this process's RSS at the fork
    (Linux keeps the high-water mark over exec), hence the ``time`` in between."""
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", rss.name, *map(str, argv)],
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"{argv[:4]} exited {proc.returncode}: {proc.stderr[-2000:]!r}")
        peak_kb = int(rss.read().split()[-1])
    return wall, peak_kb / 1024, proc.stdout


def best_time(fn: Callable[[], object], repeat: int, setup: Callable[[], object] | None = None):
    """Minimum wall time over ``repeat`` runs (``setup`` before each, not timed)."""
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def best_times(
    fns: dict[str, Callable[[], object]],
    repeat: int,
    setups: dict[str, Callable[[], object]] | None = None,
) -> dict[str, float]:
    """Minimum wall time of each function over ``repeat`` rounds, the functions taking
    turns within a round, so that a slow phase of the machine hits every one alike
    (``setups[k]``, when given, runs untimed before each run of ``fns[k]``)."""
    times = {k: float("inf") for k in fns}
    setups = setups or {}
    for _ in range(repeat):
        for k, fn in fns.items():
            if k in setups:
                setups[k]()
            t0 = time.perf_counter()
            fn()
            times[k] = min(times[k], time.perf_counter() - t0)
    return times


def smoke_output(out: Path) -> Path:
    """Where a smoke run (``--quick``) writes: beside the real results, in ``quick/``, so
    that it never replaces a file README's figures come from."""
    return out.parent / "quick" / out.name


def size_arguments(
    description: str, elements: int, repeat: int, quick: tuple[int, int], out: Path
) -> argparse.Namespace:
    """The options of a single-tensor benchmark: ``--elements``, ``--repeat``, ``--quick``
    (a smoke run of ``quick`` = (elements, rounds)) and ``--out``; the run's size lands
    in ``n`` and ``rounds``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--elements", type=int, default=elements, help="tensor size")
    ap.add_argument("--repeat", type=int, default=repeat, help="rounds (best kept)")
    ap.add_argument("--quick", action="store_true", help=f"a smoke run: {quick[0]} elements")
    ap.add_argument("--out", type=Path, default=None, help=f"default {out} (--quick: quick/)")
    args = ap.parse_args()
    args.n, args.rounds = quick if args.quick else (args.elements, args.repeat)
    args.out = args.out or (smoke_output(out) if args.quick else out)
    return args
