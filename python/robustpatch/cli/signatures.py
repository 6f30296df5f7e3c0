"""Commands that make or read signature files: extract, quantize, similarity, combine,
detect. Each has an ``add_*`` function that registers its parser and a ``run_*``
handler that reports through :func:`~robustpatch.cli.output.report`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidArgumentError
from . import parser as cli_args
from .output import json_text, print_table, progress_bar, report

if TYPE_CHECKING:
    import numpy as np

# ---------------------------------------------------------------------------- extract


def _layers_arg(values: list[str] | None) -> Any:
    if not values:
        return "auto"
    if len(values) == 1:
        v = values[0]
        if v in ("auto", "all"):
            return v
        if v.isdigit():
            return int(v)
    return values


def _kv(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise cli_args.UsageError(f"expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value, parse_constant=_not_strict_json)
        except ValueError:  # not JSON (or NaN/Infinity in it): kept as the text given
            out[key] = value
    return out


def _not_strict_json(constant: str) -> Any:
    """NaN and Infinity are JSON to Python only: in the metadata, they would make the
    signature's header, and ``inspect --json``, invalid JSON elsewhere."""
    raise ValueError(constant)


def _layer_kwargs(args: Any) -> dict[str, Any]:
    """``layers`` (and ``param_budget``) for extract; a budget replaces the layer rule."""
    layers = _layers_arg(args.layers)
    if args.param_budget is None:
        return {"layers": layers}
    if layers != "auto":
        raise cli_args.UsageError(
            "--param-budget cannot be combined with --layers all, N or a regex"
        )
    return {"layers": layers, "param_budget": args.param_budget}


def run_extract(args: Any) -> None:
    r"""extract a robust weight signature from pretrained, clean and robust checkpoints

    example:
    robustpatch extract pre.safetensors clean.safetensors fog.safetensors -o fog.rws \
        --bits 4 --provenance corruption=fog
    """
    from ..extraction import checkpoint_files, extract_to

    quant, layers, provenance = (
        cli_args.quant_options(args),
        _layer_kwargs(args),
        _kv(args.provenance),
    )
    pretrained = None if args.pretrained == "-" else args.pretrained  # '-': none given
    inputs = checkpoint_files(pretrained, args.clean, args.robust)
    cli_args.check_outputs(args, inputs, [args.output])
    with progress_bar(args, "extract", unit="tensor") as tick:
        sig = extract_to(  # streamed: each entry written as it is computed
            args.output,
            pretrained,
            args.clean,
            args.robust,
            **layers,
            **quant,
            method=args.method,
            energy=args.energy,
            name=args.name or Path(args.output).stem,
            provenance=provenance,
            progress=tick,
            durable=args.durable,
        )
    layers = sig.meta["layers"]
    left_out = {k: sig.meta.get(k) or [] for k in ("skipped", "dropped")}
    rep = {
        "file": args.output,
        "name": sig.name,
        "entries": sig.entries,
        "bytes": sig.nbytes,
        "layers": layers,
        **left_out,
        "quantization": sig.meta.get("quantization"),
    }
    text = (
        f"wrote {args.output}: {sig.entries} entries, {sig.nbytes} bytes "
        f"({layers.get('units', '?')} of {layers.get('of', '?')} layers)"
    )
    why = {
        "skipped": "unchanged, or not in the pretrained checkpoint",
        "dropped": "changed but outside the selected layers",
    }
    for key, names in left_out.items():
        if names:
            text += f"\n{key} {len(names)} tensors ({why[key]}): {_some(names)}"
    report(args, rep, text)


def _some(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names and how many more (``--json`` lists them all)."""
    more = len(names) - shown
    return ", ".join(names[:shown]) + (f" and {more} more (--json lists them)" if more > 0 else "")


def extract_arguments(p: Any) -> None:
    p.add_argument("pretrained", help="pretrained checkpoint ('-' with --method difference)")
    p.add_argument("clean", help="clean fine-tune (.safetensors, *.index.json or .pt)")
    p.add_argument("robust", help="robust fine-tune, same architecture")
    cli_args.add_output(p, "signature file to write")
    cli_args.add_durable_flag(p)
    p.add_argument(
        "--layers",
        type=cli_args.layer_arg,
        action="append",
        help="auto (default), all, a number of leading layers, or regexes (repeat)",
    )
    p.add_argument(
        "--param-budget",
        type=cli_args.fraction_arg,
        metavar="FRACTION",
        help="leading layers holding at most this share of the model's parameters, "
        "in (0, 1] (instead of --layers)",
    )
    p.add_argument(
        "--energy",
        type=cli_args.fraction_arg,
        default=0.9,
        metavar="FRACTION",
        help="energy share for --layers auto, in (0, 1]",
    )
    p.add_argument(
        "--method",
        default="projection",
        choices=["projection", "difference"],
        help="robust change orthogonal to the clean one (the paper's), or robust minus clean",
    )
    p.add_argument("--name", help="signature name (default: the output file's stem)")
    p.add_argument(
        "--provenance", action="append", metavar="KEY=VALUE", help="provenance to record (repeat)"
    )
    cli_args.add_quant_args(p, required=False)


# ---------------------------------------------------------------------------- quantize


def run_quantize(args: Any) -> None:
    """compress a signature's deltas to a few bits per weight

    example:
    robustpatch quantize fog.rws -o fog4.rws --bits 4 --scheme affine --group 128
    """
    from ..signature import Signature

    cli_args.check_outputs(args, [args.input], [args.output])
    sig = Signature.load(args.input)
    q = sig.quantize(args.bits, args.scheme, args.granularity, args.group)
    q.save(args.output)
    rep = {
        "file": args.output,
        "bytes": q.nbytes,
        "delta_ratio": q.delta_ratio,
        "quantization": q.meta["quantization"],
    }
    report(
        args,
        rep,
        f"wrote {args.output}: {q.nbytes} bytes ({q.delta_ratio:.3f} of the float32 delta)",
    )


def quantize_arguments(p: Any) -> None:
    p.add_argument("input", help="signature file")
    cli_args.add_output(p, "quantized signature file to write")
    cli_args.add_quant_args(p, required=True)


# ---------------------------------------------------------------------------- similarity


def _signature_files(paths: list[str]) -> list[str]:
    """The files given, a folder standing for the ``*.rws`` files in it (sorted)."""
    out = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(str(f) for f in Path(p).glob("*.rws") if f.is_file())
            if not found:
                raise InvalidArgumentError(f"{p}: folder holds no .rws signature files")
            out += found
        else:
            out.append(p)
    return out


def run_similarity(args: Any) -> None:
    """cosine similarity matrix of signatures, rows and columns labelled by file; a
    folder stands for the .rws files in it. Quantized signatures are compared from
    their packed codes (decoded a tile at a time), all pairs in one Gram matrix

    example:
    robustpatch similarity fog.rws snow.rws noise.rws
    robustpatch similarity library/ --json
    """
    from ..signature import Signature, similarity

    files = _signature_files(args.signatures)
    sigs = [Signature.load(p) for p in files]
    m = similarity(sigs)
    labels = cli_args.file_labels(files)
    if args.json:
        rep = {
            "labels": labels,
            "files": files,
            "names": [s.name for s in sigs],
            "cosine": m.tolist(),
        }
        print(json_text(rep))
        return
    rows = [[n, *(f"{x:+.3f}" for x in row)] for n, row in zip(labels, m)]
    print_table(rows, ["", *labels])


def similarity_arguments(p: Any) -> None:
    p.add_argument("signatures", nargs="+", help="signature files, or folders of them")


# ---------------------------------------------------------------------------- combine


def run_combine(args: Any) -> None:
    """weighted sum of signatures as one (unquantized) signature file: applying it at
    alpha 1 equals applying the parts with alpha = their coefficients

    example:
    robustpatch combine fog.rws noise.rws --coef 1 --coef 0.5 -o fog_noise.rws
    """
    from ..signature import Signature, combine

    coefs = cli_args.per_signature(args.coef, len(args.signatures), "--coef")
    cli_args.check_outputs(args, args.signatures, [args.output])
    sig = combine([Signature.load(p) for p in args.signatures], coefs, name=args.name)
    sig.save(args.output)
    rep = {
        "file": args.output,
        "name": sig.name,
        "entries": len(sig),
        "bytes": sig.nbytes,
        "components": sig.meta["components"],
    }
    report(args, rep, f"wrote {args.output}: signature {sig.name!r}, {len(sig)} entries")


def combine_arguments(p: Any) -> None:
    p.add_argument("signatures", nargs="+", help="signature files")
    cli_args.add_output(p, "signature file to write")
    cli_args.add_per_signature(p, "--coef", cli_args.coef_arg, "coefficient")
    p.add_argument(
        "--name", help="signature name (default: the sum written out, e.g. fog+0.5*noise)"
    )


# ---------------------------------------------------------------------------- detect


def _model_delta(model: str, base: str, names: set[str]) -> dict[str, np.ndarray]:
    """``model − base`` (float32) for the tensors in ``names`` both checkpoints hold."""
    from ..dtypes import widen
    from ..errors import MismatchError
    from ..extraction import open_source

    m, b = open_source(model), open_source(base)
    out = {}
    for n in sorted(names):
        ms, bs = m.spec(n), b.spec(n)
        if ms is None or bs is None or not (m.is_float(n) and b.is_float(n)):
            continue
        if ms[1] != bs[1]:
            raise MismatchError(f"{n}: shape {list(ms[1])} in {model}, {list(bs[1])} in {base}")
        out[n] = widen(m.get(n)) - widen(b.get(n))
    if not out:
        raise MismatchError(f"{model} and {base} share no tensor with the signatures")
    return out


def run_detect(args: Any) -> None:
    r"""rank signatures by cosine similarity to a query: a signature, or the weight
    change of a fine-tuned model from its base; a folder stands for the .rws files in it
    (a file given twice is one row)

    example:
    robustpatch detect fog.rws snow.rws noise.rws \
        --model tuned.safetensors --base clean.safetensors
    """
    from ..signature import Signature, detect

    if args.model is not None and args.base is None:
        raise cli_args.UsageError("--model needs --base, the checkpoint it was fine-tuned from")
    if args.query is not None and args.base is not None:
        raise cli_args.UsageError("--base goes with --model (a --query is a signature already)")
    files = list(dict.fromkeys(_signature_files(args.signatures)))
    library = dict(zip(cli_args.file_labels(files), files))
    sigs = {label: Signature.load(p) for label, p in library.items()}
    if args.query is not None:
        query: Any = Signature.load(args.query)
    else:
        names = {n for s in sigs.values() for n in s.deltas}
        query = _model_delta(args.model, args.base, names)
    ranking = [
        {"label": label, "file": library[label], "name": sigs[label].name, "cosine": score}
        for label, score in detect(query, sigs)
    ]
    if args.json:
        print(json_text({"query": args.query or [args.model, args.base], "ranking": ranking}))
        return
    rows = [[r["label"], r["name"], f"{r['cosine']:+.3f}"] for r in ranking]
    print_table(rows, ["signature", "name", "cosine"])


def detect_arguments(p: Any) -> None:
    p.add_argument("signatures", nargs="+", help="known signature files, or folders of them")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="signature file to identify")
    query.add_argument("--model", help="fine-tuned checkpoint whose change to identify")
    p.add_argument("--base", help="the checkpoint --model was fine-tuned from")
