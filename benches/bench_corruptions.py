"""Benchmark: robustpatch.lab.corruptions (batched torch) vs imagecorruptions (image by image).

All 19 corruption types x 5 severities on N real 32-px images (random crops of the bundled
scikit-image / scikit-learn photographs), on CPU, both in the same run:

- ``ours``: ``corrupt(batch, name, severity, scale="imagenet")`` on the whole batch -- the
  same parameter table imagecorruptions uses, so both do the same work;
- ``ours_cifar``: the same with the CIFAR-10-C table (the default for 32-px images);
- ``reference``: ``imagecorruptions.corrupt`` on every image in a Python loop.

Both sides use the same number of threads (``--threads``, default 1: one core each, the
like-for-like comparison with single-threaded numpy). One warm-up call per type is not timed.

Writes JSON (default ``benches/results/corruptions.json``) and prints a Markdown table.
``--agreement`` also runs the 224-px agreement report against imagecorruptions and writes
``benches/results/corruptions_agreement.json``.

    python benches/bench_corruptions.py                 # full run, 1,024 images
    python benches/bench_corruptions.py --images 64     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from robustpatch.lab import _reference  # noqa: E402
from robustpatch.lab.corruptions import CORRUPTIONS, corrupt  # noqa: E402


def crops32(n: int, seed: int = 0) -> np.ndarray:
    """``n`` random 32x32 crops (box-downsampled from 48-160 px windows) of real photos."""
    from PIL import Image

    photos = _reference.sample_images(448)
    rs = np.random.RandomState(seed)
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        photo = photos[rs.randint(len(photos))]
        size = rs.randint(48, 161)
        y, x = rs.randint(0, 448 - size, size=2)
        im = Image.fromarray(photo[y : y + size, x : x + size]).resize((32, 32), Image.BOX)
        out[i] = np.asarray(im)
    return out


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="number of 32-px images")
    parser.add_argument("--severities", default="1,2,3,4,5")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads")
    parser.add_argument("--out", default=str(ROOT / "benches/results/corruptions.json"))
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--agreement", action="store_true", help="also run the 224-px agreement report"
    )
    parser.add_argument(
        "--agreement-out", default=str(ROOT / "benches/results/corruptions_agreement.json")
    )
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    try:
        import cv2

        cv2.setNumThreads(args.threads)
    except ImportError:  # pragma: no cover
        pass
    ic = None if args.skip_reference else _reference.load_reference()
    names = args.corruptions.split(",")
    sevs = [int(s) for s in args.severities.split(",")]
    images = crops32(args.images)
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))

    rows = {}
    for name in names:
        # warm-up (caches of matrices / schedules; imports), not timed
        corrupt(batch[:8], name, 3, seed=0, scale="imagenet")
        corrupt(batch[:8], name, 3, seed=0, scale="cifar")
        if ic is not None:
            _reference.reference_corrupt(images[0], name, 3, seed=0)
        per = {}
        for s in sevs:
            t_ours, _ = timed(
                lambda s=s, name=name: corrupt(batch, name, s, seed=s, scale="imagenet")
            )
            t_cifar, _ = timed(
                lambda s=s, name=name: corrupt(batch, name, s, seed=s, scale="cifar")
            )
            t_ref = None
            if ic is not None:
                np.random.seed(s)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    t_ref, _ = timed(
                        lambda s=s, name=name: [
                            ic.corrupt(img, corruption_name=name, severity=s) for img in images
                        ]
                    )
            per[str(s)] = {"ours_s": t_ours, "ours_cifar_s": t_cifar, "reference_s": t_ref}
        ours = sum(v["ours_s"] for v in per.values())
        cifar = sum(v["ours_cifar_s"] for v in per.values())
        ref = None if ic is None else sum(v["reference_s"] for v in per.values())
        rows[name] = {
            "ours_s": ours,
            "ours_cifar_s": cifar,
            "reference_s": ref,
            "speedup": None if ref is None else ref / ours,
            "per_severity": per,
        }
        msg = f"{name:18s} ours {ours:7.3f}s  cifar-table {cifar:7.3f}s"
        if ref is not None:
            msg += f"  reference {ref:8.2f}s  speedup {ref / ours:7.1f}x"
        print(msg, file=sys.stderr, flush=True)

    total_ours = sum(r["ours_s"] for r in rows.values())
    total_cifar = sum(r["ours_cifar_s"] for r in rows.values())
    total_ref = None if ic is None else sum(r["reference_s"] for r in rows.values())
    result = {
        "benchmark": "corruptions: robustpatch.lab (batched torch) vs imagecorruptions (per image)",
        "config": {
            "images": args.images,
            "image_size": 32,
            "severities": sevs,
            "threads": args.threads,
            "device": "cpu",
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
            "ours_table": (
                "imagenet (same parameters as imagecorruptions); ours_cifar_s: cifar table"
            ),
        },
        "types": rows,
        "total": {
            "ours_s": total_ours,
            "ours_cifar_s": total_cifar,
            "reference_s": total_ref,
            "speedup": None if total_ref is None else total_ref / total_ours,
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{args.images} images of 32x32, severities {sevs}, CPU, {args.threads} thread(s)\n")
    print("| corruption | ours (s) | ours, CIFAR table (s) | imagecorruptions (s) | speedup |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        ref = "-" if r["reference_s"] is None else f"{r['reference_s']:.2f}"
        sp = "-" if r["speedup"] is None else f"{r['speedup']:.1f}x"
        print(f"| {name} | {r['ours_s']:.3f} | {r['ours_cifar_s']:.3f} | {ref} | {sp} |")
    t = result["total"]
    ref = "-" if t["reference_s"] is None else f"{t['reference_s']:.2f}"
    sp = "-" if t["speedup"] is None else f"{t['speedup']:.1f}x"
    print(f"| **total** | {t['ours_s']:.3f} | {t['ours_cifar_s']:.3f} | {ref} | {sp} |")
    print(f"\nwrote {out}")

    if args.agreement:
        report = _reference.agreement_report()
        path = Path(args.agreement_out)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print("\n" + _reference.format_report(report))
        print(
            f"\nstandard types passing: {report['standard_passed']} / {report['standard_compared']}"
            f"\nwrote {path}"
        )


if __name__ == "__main__":
    main()
