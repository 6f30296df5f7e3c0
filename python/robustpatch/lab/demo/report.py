"""The report: results.json, figures and report.md from a results object."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .. import outputs
from .. import plots as P
from .claims import NEAR_MISS, NEAR_MISS_RULE, _ci, _fmt, _notes, _pct, _signed, verdict_counts
from .config import POLICY, PRIMARY


def _cell(text: str) -> str:
    """Text for a Markdown table cell (arm names hold '|')."""
    return text.replace("|", "\\|")


class _Doc:
    """The report's lines; sections and figures numbered in the order they are written."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.sections = 0
        self.figures = 0

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def section(self, title: str, figure: str | None = None, caption: str = "") -> None:
        """A numbered section heading, opened by its figure where one is given."""
        self.sections += 1
        self.lines += [f"## {self.sections}. {title}", ""]
        if figure is not None:
            self.figure(figure, caption)

    def figure_section(self, key: str, figs: dict[str, str], **values: Any) -> None:
        """The section of figure `key`: its title, then the figure with its caption."""
        title, caption = _FIGURE_SECTIONS[key]
        self.section(title, figs[key], caption.format(**values))

    def table(self, header: list[str], rows: Iterable[list[str]]) -> None:
        """A Markdown table: the header, its rule, one line per row."""
        self.lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        self.lines += ["| " + " | ".join(row) + " |" for row in rows]

    def figure(self, path: str, caption: str) -> None:
        self.figures += 1
        n = self.figures
        self.lines += [f"![Figure {n}]({path})", "", f"*Figure {n}. {caption}*", ""]


def write_report(out: Path, results: dict) -> None:
    """results.json, figures and report.md."""
    out = Path(out)
    outputs.write_json(out / "results.json", _jsonable(results))
    figs = _figures(out, results)
    doc = _Doc()
    doc.add("# robustpatch demo report", "", "## Summary", "", *summary_lines(results), "")
    _claims_section(doc, results)
    _setup_section(doc, results)
    _primary_section(doc, results, figs)
    _arms_section(doc, results)
    _layers_section(doc, results, figs)
    _depth_section(doc, results, figs)
    _alpha_section(doc, results, figs)
    for key, body in _OPTIONAL_SECTIONS:
        if results.get(key):
            doc.figure_section(key, figs)
            body(doc, results[key])
    _compression_section(doc, results, figs)
    _removal_section(doc, results)
    _robustifiers_section(doc, results)
    outputs.write_text(out / "report.md", "\n".join(doc.lines))


def summary_lines(results: dict) -> list[str]:
    """Five lines: what ran, on what software, the pre-registered arm's numbers, the share
    of the robust gain it recovers, and the claims' verdicts."""
    cfg, prov = results["config"], results["provenance"]
    pc = results["per_corruption"]
    names = list(pc)
    reps = results.get("replicates")
    seeds = [r["seed"] for r in next(iter(reps.values()))["seeds"]] if reps else [cfg["seed"]]
    counts = verdict_counts(results["claims"])
    open_ids = [str(c["id"]) for c in results["claims"] if not c["passed"]]

    def mean_of(arm: str) -> str:
        return _fmt(float(np.mean([pc[c]["arms"][arm]["mean"] for c in names])))

    return [
        f"- **Run**: the {cfg.get('size', 'custom')}-size demo: {len(names)} corruptions "
        f"({', '.join(names)}) × severities 1–5 on 32-px digits; clean and robust twins "
        f"fine-tuned from one pretrained CNN on seeds {seeds}; {results['seconds']:.0f} s.",
        f"- **Software**: robustpatch {prov['robustpatch']} (commit {prov['commit']}), torch "
        f"{prov['torch']}, numpy {prov['numpy']}, Python {prov['python']}; device "
        f"{prov['device']}, {prov['torch_threads']} torch thread(s).",
        f"- **Pre-registered arm** `{PRIMARY}` (first {results['shallow_units']} weight "
        f"layers, {100 * results['shallow_param_fraction']:.1f}% of the parameters, α = 1, BN "
        f"re-estimated), seed {cfg['seed']}, mean accuracy on the corrupted test set: clean "
        f"model {mean_of('clean')}%, BN-only {mean_of('bn_reestimation_only')}%, patched "
        f"{mean_of(PRIMARY)}%, robust twin {mean_of('robust')}%.",
        "- **Robust gain recovered** by the patch: "
        + ", ".join(f"{c} {_pct(pc[c]['arms'][PRIMARY]['recovered'])}" for c in names)
        + " (the robust twin's gain over the clean model = 100%).",
        f"- **Claims**: of {sum(counts.values())} sub-claims {counts['holds']} hold, "
        f"{counts['near miss']} near miss (within {100 * NEAR_MISS:.0f}% of the threshold), "
        f"{counts['fails']} fail; claims not holding: {', '.join(open_ids) or 'none'} "
        "(section 1).",
    ]


def console_lines(results: dict) -> list[str]:
    """What `robustpatch demo` prints: the pre-registered arm per corruption and the
    claims' verdict counts."""
    lines = [f"pre-registered arm {PRIMARY}: mean accuracy over severities 1-5, corrupted test"]
    for s in results["summary"]:
        m = s["mean"]
        lines.append(
            f"{s['corruption']:16s} clean model {m['clean']:5.1f}%  "
            f"BN-only {m['bn_reestimation_only']:5.1f}%  patched {m[PRIMARY]:5.1f}%  "
            f"robust twin {m['robust']:5.1f}%  recovered {_pct(s['recovered'][PRIMARY])}"
        )
    counts = verdict_counts(results["claims"])
    lines.append(
        f"claims: {counts['holds']} sub-claims hold, {counts['near miss']} near miss, "
        f"{counts['fails']} fail"
    )
    return lines


def paper_console_lines(results: dict) -> list[str]:
    """What `robustpatch demo` prints after the paper's protocol
    (:func:`robustpatch.lab.paper.run.run_paper`): per backbone, how many pre-registered
    sub-claims hold, are inconclusive and fail."""
    cfg = results["config"]
    lines = [
        f"paper's protocol on {results['data']}: severity {cfg['severity']}, "
        f"{len(cfg['seeds'])} fine-tune seeds, verdicts from 95% intervals"
    ]
    for name, bb in results["backbones"].items():
        n = Counter(r["verdict"] for r in bb["claims"])
        lines.append(
            f"{name:20s} claims: {n['holds']} hold, {n['inconclusive']} inconclusive, "
            f"{n['fails']} fail"
        )
    return lines


def _claims_section(doc: _Doc, results: dict) -> None:
    doc.section("Claims")
    doc.add(
        f"Judged on the pre-registered arm `{PRIMARY}`. A claim holds when every one of its "
        "sub-claims holds. Each sub-claim's verdict is *holds*, *near miss* or *fails*; a "
        + NEAR_MISS_RULE,
        "",
    )
    for c in results["claims"]:
        doc.add(f"- **{c['id']}** ({c['verdict']}): {c['claim']}")
    doc.add("", "| claim | measured | threshold | verdict |", "|---|---|---|---|")
    for c in results["claims"]:
        for check in c["checks"]:
            doc.add(
                f"| {c['id']} · {check['claim']} | {check['measured']} | "
                f"{check['threshold_text']} | {check['verdict']} |"
            )
    doc.add("", "### Notes", "")
    for c in results["claims"]:
        doc.add(*(f"- {c['id']}: {note}" for note in c["notes"]))
    doc.add(*(f"- {line}" for line in _notes(results)), "")


def _setup_section(doc: _Doc, results: dict) -> None:
    cfg, prov, m = results["config"], results["provenance"], results["machine"]
    ft = cfg["finetune"]
    doc.section("Setup")
    doc.add(
        f"robustpatch {prov['robustpatch']}, commit {prov['commit']}; torch {prov['torch']}, "
        f"numpy {prov['numpy']}, Python {prov['python']}. Device {prov['device']}, "
        f"{results['seconds']:.0f} s wall time, {prov['torch_threads']} torch thread(s) on "
        f"{m['cpus']} CPU(s), load average {m['load_average_start']} at start and "
        f"{m['load_average_end']} at the end. Seed {cfg['seed']}. Corruption strengths: "
        f"{cfg['scale']}-C parameters on 32-px images. A CPU run reproduces these numbers "
        "exactly only with the same torch thread count (`robustpatch demo --threads N`): "
        "float sums split differently across threads and training amplifies the difference.",
        "",
        f"Pretraining: {cfg['pretrain_images']} procedural shapes, {cfg['pretrain_epochs']} "
        f"epochs. Fine-tuning (clean and robust twins from the same pretrained weights, seed "
        f"and data order): SGD momentum {ft['momentum']}, weight decay {ft['weight_decay']}, "
        f"lr {ft['lr']} × {ft['gamma']} after epochs {ft['milestones']}, {ft['epochs']} "
        f"epochs, batch {ft['batch_size']}; robust twins see every batch corrupted at a random "
        "severity 1–5. Stage times (s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items())
        + ".",
        "",
        "Arms: **clean model**; **BN-only**: the clean model with BatchNorm statistics "
        f"re-estimated on {cfg['bn_images']} unlabeled corrupted training images (all "
        "severities); **robust twin**: the model fine-tuned on corrupted images; **patched**: "
        "the clean model plus a signature (α = 1) under a BatchNorm policy: `reestimate` "
        "(re-estimated like BN-only) or `signature` (the robust statistics the signature "
        "ships for the layers it patches, the clean ones elsewhere). **shallow** = the first "
        f"{results['shallow_units']} weight layers (with their BatchNorm), "
        f"{100 * results['shallow_param_fraction']:.1f}% of the parameters (the most leading "
        f"layers within a {100 * cfg['budget']:.0f}% budget). Every claim is judged on one arm "
        f"fixed in advance: `{PRIMARY}`. *Corrupted test* accuracies are means over severities "
        "1–5 on the corrupted digits test set, *clean test* accuracies are on the unchanged "
        "test set; *recovered* = the arm's gain over the clean model ÷ the robust twin's.",
        "",
        "The clean-test accuracy of an arm that re-estimates BatchNorm is given two ways: "
        "**adapted** (the patched weights with statistics re-estimated on unlabeled clean "
        "images — the policy adapts to the data it is deployed on; used by claim 2) and "
        "**static** (keeping the corrupted-data statistics).",
        "",
    )


def _primary_section(doc: _Doc, results: dict, figs: dict[str, str]) -> None:
    pc = results["per_corruption"]
    doc.section(f"Pre-registered arm `{PRIMARY}` per corruption (digits)")
    doc.add(
        "| corruption | clean model, clean test (%) | clean model, corrupted test (%) | "
        "BN-only, corrupted test (%) | patched, corrupted test (%) | robust twin, corrupted "
        "test (%) | robust gain recovered | patched − BN-only (points) | patched, clean test: "
        "adapted / static BN (%) | parameters patched |",
        "|---|---|---|---|---|---|---|---|---|---|",
    )
    for c, r in pc.items():
        a = r["arms"]
        p = a[PRIMARY]
        doc.add(
            f"| {c} | {a['clean']['clean']:.1f} | {a['clean']['mean']:.1f} | "
            f"{a['bn_reestimation_only']['mean']:.1f} | {p['mean']:.1f} | "
            f"{a['robust']['mean']:.1f} | {_pct(p['recovered'])} | "
            f"{_signed(p['mean'] - a['bn_reestimation_only']['mean'])} | "
            f"{p['clean_adapted']:.1f} / {p['clean']:.1f} | "
            f"{100 * r['signatures']['shallow']['param_fraction']:.1f}% |"
        )
    if "replicates" in results:
        doc.add(*_replicates_section(results["replicates"]))
    doc.add("")
    doc.figure(
        figs["arms"],
        "Accuracy on the corrupted digits test set against severity, one panel per "
        "corruption: the clean model, BN re-estimation alone, the robust twin, and the clean "
        f"model patched by the shallow signature (`{PRIMARY}`, pre-registered; "
        f"`shallow|signature`) and by the full one (`full|{POLICY}`).",
    )


_ARM_LABELS = {
    "clean": "clean model",
    "bn_reestimation_only": "BN re-estimation only",
    "robust": "robust twin",
    PRIMARY: f"patched {PRIMARY} (pre-registered)",
    "shallow|signature": "patched shallow|signature",
    f"full|{POLICY}": f"patched full|{POLICY}",
}


def _arms_section(doc: _Doc, results: dict) -> None:
    doc.section("Every arm")
    for c, r in results["per_corruption"].items():
        sigs = r["signatures"]
        doc.add(
            f"### {c}",
            "",
            "| arm | corrupted test, severity 1–5 (%) | corrupted test, mean (%) | robust gain "
            "recovered | clean test: adapted / static BN (%) | parameters patched | size |",
            "|---|---|---|---|---|---|---|",
        )
        for arm, v in r["arms"].items():
            info = sigs.get(arm.split("|")[0])
            sev = " ".join(f"{x:.0f}" for x in v["severity"])
            size = (
                f"{100 * info['param_fraction']:.1f}% | {info['nbytes'] / 1024:.1f} KiB |"
                if info
                else " | |"
            )
            doc.add(
                f"| {_cell(arm)} | {sev} | {v['mean']:.1f} | {_pct(v['recovered'])} | "
                f"{v['clean_adapted']:.1f} / {v['clean']:.1f} | " + size
            )
        doc.add("")
    doc.add(
        "`budget-by-difference`: layers taken by largest relative difference within the "
        "same budget (an alternative selection, not the one claims are judged on).",
        "",
    )


def _layers_section(doc: _Doc, results: dict, figs: dict[str, str]) -> None:
    pc = results["per_corruption"]
    doc.figure_section("layers", figs)
    doc.table(
        ["corruption", "relative difference ‖θr−θc‖/‖θc‖ per layer", "coefficient ⟨Δr,d⟩/‖d‖²"]
        + ["largest"],
        (_layer_row(c, r["layer_profile"]) for c, r in pc.items()),
    )
    doc.add("", "Layers: " + ", ".join(next(iter(pc.values()))["layer_profile"]["layers"]), "")


def _layer_row(c: str, p: dict) -> list[str]:
    differences = " ".join(f"{v:.3f}" for v in p["relative_difference"])
    return [c, differences, " ".join(f"{v:.2f}" for v in p["coefficient"]), str(p["largest"])]


def _depth_section(doc: _Doc, results: dict, figs: dict[str, str]) -> None:
    pc = results["per_corruption"]
    rows0 = next(iter(pc.values()))["depth_sweep"]["rows"]
    doc.figure_section("depth", figs, budget=100 * results["config"]["budget"])
    doc.add(
        "Gain (points over the clean model, corrupted test) when patching the first k "
        "layers, BN re-estimated:",
        "",
    )
    doc.table(
        ["corruption"] + [f"k={r['units']} ({100 * r['param_fraction']:.0f}%)" for r in rows0],
        ([c] + [_signed(x["gain"]) for x in r["depth_sweep"]["rows"]] for c, r in pc.items()),
    )
    doc.add("")


def _alpha_section(doc: _Doc, results: dict, figs: dict[str, str]) -> None:
    pc = results["per_corruption"]
    alphas = next(iter(pc.values()))["alpha_sweep"]["alphas"]
    doc.figure_section("alpha", figs)
    doc.add("Mean accuracy on the corrupted test set (%):", "")
    doc.table(
        ["corruption", "BN policy"] + [f"α={a:g}" for a in alphas],
        (
            [c, pol] + [f"{x['mean']:.1f}" for x in rows]
            for c, r in pc.items()
            for pol, rows in r["alpha_sweep"]["policies"].items()
        ),
    )
    doc.add("")


def _similarity_section(doc: _Doc, sim: Any) -> None:
    doc.add("Nearest other signature:", "")
    for lbl, v in sim["nearest"].items():
        doc.add(f"- {lbl} → {v['nearest']} ({v['cosine']:.2f})")
    det = sim.get("detection")
    if det:
        doc.add(
            "",
            "Detection (robust − clean weights of the second-seed twins, ranked against the "
            "seed-0 signatures with `robustpatch.detect`):",
            "",
        )
        for truth, r in det["queries"].items():
            top = ", ".join(f"{n} {s:.2f}" for n, s in r["ranking"][:3])
            doc.add(
                f"- {truth}: predicted {r['predicted']} "
                f"({'correct' if r['correct'] else 'wrong'}; {top})"
            )
    doc.add("")


def _composition_section(doc: _Doc, comps: Any) -> None:
    doc.add(
        "Sum of two signatures (α = 1 each). Under `reestimate` the sum's BatchNorm "
        "statistics come from both corruptions in equal shares (it does not know which "
        "comes); each signature alone re-estimates on its own. Accuracies (%) on the "
        "corrupted test set of the corruption evaluated on, unless marked clean test.",
        "",
        "| pair | evaluated on | BN policy | clean model | signature alone | sum | gain kept "
        "| sum, clean test (adapted BN) |",
        "|---|---|---|---|---|---|---|---|",
    )
    for r in comps:
        for pol, rows in r["policies"].items():
            for c, row in rows.items():
                doc.add(
                    f"| {'+'.join(r['pair'])} | {c} | {pol} | {row['clean_mean']:.1f} "
                    f"| {row['alone_mean']:.1f} | {row['sum_mean']:.1f} | "
                    f"{_pct(row['kept'])} | {row['sum_clean_adapted']:.1f} |"
                )
    doc.add(
        "",
        "Diagnostics (`reestimate`): the sum with statistics re-estimated on the evaluated "
        "corruption alone, and the mean 0.5·(a + b) with mixed statistics; kept = share of "
        "the signature's own gain.",
        "",
        "| pair | evaluated on | sum, own-corruption BN | kept | mean 0.5·(a+b) | kept |",
        "|---|---|---|---|---|---|",
    )
    for r in comps:
        for c, row in (r.get("variants") or {}).items():
            doc.add(
                f"| {'+'.join(r['pair'])} | {c} | {row['sum_own_bn_mean']:.1f} | "
                f"{_pct(row['sum_own_bn_kept'])} | {row['mean_mean']:.1f} | "
                f"{_pct(row['mean_kept'])} |"
            )
    doc.add("")


def _transfer_section(doc: _Doc, tr: Any) -> None:
    doc.add(
        "The digits signature applied to the clean model fine-tuned on procedural patterns "
        "(B) from the same pretrained weights. Accuracies (%) on B's corrupted test set, "
        "unless marked clean test.",
        "",
    )
    doc.table(
        ["corruption", "B clean model, clean test", "B clean model, corrupted test", "B BN-only"]
        + ["transfer (BN re-est.)", "transfer (signature BN)", "B's own signature (BN re-est.)"]
        + ["B robust twin", "transfer ÷ B's robust gain"],
        (_transfer_row(c, t) for c, t in tr.items()),
    )
    doc.add("")


def _transfer_row(c: str, t: dict) -> list[str]:
    a = t["arms"]
    own = a.get("own|reestimate", {}).get("mean", float("nan"))
    means = [a["clean"]["mean"], a["bn_reestimation_only"]["mean"]]
    means += [a["transfer|reestimate"]["mean"], a["transfer|signature"]["mean"], own]
    means.append(a["robust"]["mean"])
    return [c, f"{a['clean']['clean']:.1f}", *(f"{m:.1f}" for m in means), _pct(t["ratio"][POLICY])]


def _compression_section(doc: _Doc, results: dict, figs: dict[str, str]) -> None:
    pc = results["per_corruption"]
    comp = {c: r["compression"] for c, r in pc.items()}
    rows0 = next(iter(comp.values()))["rows"]
    sizes = (
        " — the same for every corruption (same layers, same shapes), so one line"
        if P.same_sizes(comp)
        else ", one line per corruption"
    )
    doc.figure_section("compression", figs, sizes=sizes)
    doc.add(
        "Shallow projection signature, affine quantization with one scale per output "
        "channel; size = tensor bytes stored (codes, scales, offsets, BN replacements) "
        "against the float32 robust model's tensor bytes. Gain: points over the clean model "
        "(corrupted test), with the share of the unquantized gain kept.",
        "",
        "| corruption | unquantized | " + " | ".join(f"{r['bits']} bit" for r in rows0) + " |",
        "|---|---|" + "---|" * len(rows0),
    )
    for c, cr in comp.items():
        u = cr["unquantized"]
        doc.add(
            f"| {c} gain | {_signed(u['gain'])} | "
            + " | ".join(f"{_signed(r['gain'])} ({_pct(r['kept'])})" for r in cr["rows"])
            + " |",
            f"| {c} × smaller | {u['times_smaller']:.1f} | "
            + " | ".join(f"{r['times_smaller']:.1f}" for r in cr["rows"])
            + " |",
        )
    doc.add(*_files_line(results), *_granularity_line(results), "")


def _files_line(results: dict) -> list[str]:
    files = results.get("files") or {}
    if not files:
        return []
    shown = [
        f"`{k}` {v}"
        for k, v in files.items()
        if k.endswith(".rws")
        or "pretrained" in k
        or ("digits32" in k and "-s0" in k and "clean" not in k)
    ]
    return ["", "Files on disk (bytes, safetensors with JSON metadata): " + ", ".join(shown)]


def _granularity_line(results: dict) -> list[str]:
    names = list(results["per_corruption"])
    comp0 = results["per_corruption"][names[0]]["compression"]
    if "nbytes_by_granularity" not in comp0:
        return []
    b = results["config"]["bits"]
    model_nb = comp0["model_nbytes"]
    bd = comp0["breakdown_4bit"]
    by_g = {
        g: sizes.get(b, sizes.get(str(b))) for g, sizes in comp0["nbytes_by_granularity"].items()
    }
    frac = results["shallow_param_fraction"]
    return [
        "",
        f"Size at {b} bits by granularity ({names[0]}; all corruptions have the same shapes): "
        + ", ".join(f"{g} {nb} B ({model_nb / nb:.1f}× smaller)" for g, nb in by_g.items() if nb)
        + f". At 4 bits per channel the bytes are {bd['codes']} of codes, "
        f"{bd['scales_offsets']} of scales and offsets (one pair per output channel; a 1-d "
        f"BatchNorm weight or bias has one per element) and {bd['bn_replacements']} of float32 "
        "BatchNorm replacements. With no overhead at all, a signature over "
        f"{100 * frac:.1f}% of the parameters at {b} bits would be {32 / b / frac:.1f}× "
        "smaller than the float32 model.",
    ]


def _removal_section(doc: _Doc, results: dict) -> None:
    doc.section("Removal")
    for c, r in results["per_corruption"].items():
        for what, v in r["removal"].items():
            doc.add(
                f"- {c}, {what}: bit-exact {v['bit_exact']} ({v['tensors_restored']} "
                f"tensors, {v['bn_buffers_restored']} BN buffers, "
                f"{v['elements_corrected']} elements from the undo record)"
            )
    for r in results.get("composition") or []:
        doc.add(f"- {'+'.join(r['pair'])}: bit-exact {r['removal']['bit_exact']}")
    doc.add("")


def _robustifiers_section(doc: _Doc, results: dict) -> None:
    if not results.get("robustifiers"):
        return
    from ..robustifiers import comparison_markdown

    table = comparison_markdown(results["robustifiers"]).split("\n")
    doc.section("Robustifiers compared (lab.robustifiers)")
    doc.add(*table[1:], "")


def _replicates_section(reps: dict) -> list[str]:
    """Claim 2's numbers per fine-tune seed, with mean ± 95% interval."""
    seeds = [r["seed"] for r in next(iter(reps.values()))["seeds"]]
    L = [
        "",
        f"### Claim 2 across fine-tune seeds {seeds}",
        "",
        "The same pretrained weights; per seed a clean and a robust twin fine-tuned with that "
        "seed (data order and corruption draws), the shallow signature extracted from that "
        "pair and applied to that clean twin (arm `" + PRIMARY + "`). Mean ± half-width of "
        "the 95% t interval; per-seed values in brackets.",
        "",
        "| corruption | robust gain | recovered | vs BN-only | clean accuracy lost |",
        "|---|---|---|---|---|",
    ]
    for c, r in reps.items():
        cells = [
            _seed_cell(r, "robust_gain", 1, ".1f"),
            _seed_cell(r, "recovered", 100, ".0f") + "%",
            _seed_cell(r, "vs_bn_only", 1, "+.1f"),
            _seed_cell(r, "clean_loss", 1, ".1f"),
        ]
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    return L


def _seed_cell(rep: dict, key: str, scale: float, spec: str) -> str:
    per = ", ".join(_fmt(scale * row[key], spec) for row in rep["seeds"])
    return f"{_ci(rep['stats'][key], scale, spec)} [{per}]"


def _jsonable(x: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/Inf as null."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _figures(out: Path, results: dict) -> dict[str, str]:
    pc = results["per_corruption"]
    figs = {
        "arms": P.plot_patch_arms(
            pc,
            out / "patch_gain.png",
            [
                "clean",
                "bn_reestimation_only",
                "robust",
                PRIMARY,
                "shallow|signature",
                f"full|{POLICY}",
            ],
            _ARM_LABELS,
        ),
        "layers": P.plot_layer_profile(
            {c: r["layer_profile"] for c, r in pc.items()}, out / "layers.png"
        ),
        "depth": P.plot_depth_sweep(
            {c: r["depth_sweep"] for c, r in pc.items()},
            out / "depth.png",
            results["config"]["budget"],
        ),
        "alpha": P.plot_alpha_sweep(
            {c: r["alpha_sweep"] for c, r in pc.items()}, out / "alpha.png"
        ),
        "compression": P.plot_compression(
            {c: r["compression"] for c, r in pc.items()}, out / "compression.png"
        ),
    }
    if results.get("similarity"):
        figs["similarity"] = P.plot_similarity(
            results["similarity"]["matrix"], out / "similarity.png"
        )
    if results.get("composition"):
        figs["composition"] = P.plot_composition(results["composition"], out / "composition.png")
    if results.get("transfer"):
        figs["transfer"] = P.plot_transfer(results["transfer"], out / "transfer.png")
    return {k: Path(v).name for k, v in figs.items()}


# Title and figure caption of each section that opens with its figure ({names}: filled in
# per run).
_FIGURE_SECTIONS = {
    "layers": (
        "Where robust and clean differ",
        "Per weight layer (input → output): how far the robust twin is from the clean model "
        "(left, ‖θrobust − θclean‖ / ‖θclean‖) and the projection coefficient ⟨Δr, d⟩ / ‖d‖² "
        "(right); shaded: the first third of the layers. One colour per corruption.",
    ),
    "depth": (
        "Shallow vs full",
        "Gain over the clean model (mean over severities, BN re-estimated) when the first k "
        "weight layers are patched, against the share of parameters they hold; dashed: the "
        "{budget:.0f}% parameter budget of the shallow signature.",
    ),
    "alpha": (
        "α sweep",
        "Mean accuracy on the corrupted test set against the patch strength α of the shallow "
        "signature; solid: BN re-estimated, dashed: the signature's BN statistics; grey line: "
        "α = 1. One colour per corruption.",
    ),
    "similarity": (
        "Similarity and detection",
        "Cosine similarity between shallow signatures, labelled by corruption (label colour), "
        "fine-tune seed (`/sN`, digits) and dataset (`patterns:`).",
    ),
    "composition": (
        "Composition",
        "Gain over the clean model of each signature alone and of the sum of two, evaluated "
        "on each corruption of the pair (label colour), BN re-estimated.",
    ),
    "transfer": (
        "Transfer digits → patterns",
        "Gains on the patterns dataset (B) over its clean model, per corruption (label "
        "colour): BN re-estimation alone, the digits signature, B's own signature, and B's "
        "robust twin.",
    ),
    "compression": (
        "Compression",
        "Left: share of the unquantized shallow signature's gain kept at each bit width, one "
        "line per corruption. Right: signature size against bits{sizes}; dashed: the float32 "
        "robust model.",
    ),
}

# Sections of experiments a run may skip, each written only when the run has it.
_OPTIONAL_SECTIONS = (
    ("similarity", _similarity_section),
    ("composition", _composition_section),
    ("transfer", _transfer_section),
)
