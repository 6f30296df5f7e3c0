"""Robustifiers from three papers, and a side-by-side comparison with robust weight signatures.

1. **Non-robustness transfer** (Zhang et al., arXiv 2106.10989, "Pre-training also transfers
   non-robustness"): :func:`nonrobustness_transfer` fine-tunes the same architecture from a
   random start, from standard pretrained weights and from adversarially (PGD) pretrained
   weights, and measures how much FGSM / PGD robustness each start hands down. The
   *discrepancy-mitigating* fine-tune (:func:`discrepancy_finetune`) adds
   ``beta * ||f(x) - f(x')||^2`` to the cross-entropy, with ``f`` the penultimate features and
   ``x'`` a few PGD steps maximising that feature distance in an L-infinity ball.
2. **DAFT** (Nasery et al., arXiv 2208.09139, "DAFT: distilling adversarially fine-tuned
   models for better OOD generalization"): a teacher learns many features by standard
   training; its head is then adversarially trained on those features
   (:func:`adversarial_head`, TRADES-style so its soft outputs stay a good guide) and the
   teacher is distilled into a student, also on perturbed inputs (:func:`distill`).
   :func:`domain_generalization` evaluates it DomainBed-style (leave one domain out) on
   domains rendered from the embedded digits (:func:`render_domain`), against ERM and plain
   distillation.
3. **Efficiently robustify pre-trained models** (Jain et al., arXiv 2309.07499):
   a small teacher is made robust cheaply with AugMix-style mixing of corrupted views
   (:func:`augmix`, :func:`augmix_finetune`); then only a few tensors of a larger model
   (normalisation layers, the first block...) are tuned by distillation from that teacher
   and from the large model's own clean outputs (:func:`robustify_with_small_teacher`).
   :func:`small_teacher_study` reports the tuned-parameter fraction, the wall time against a
   full robust fine-tune, and whether clean and transfer (linear probe) accuracy are kept.

:func:`compare_methods` runs corruption fine-tuning, PGD adversarial training, discrepancy
mitigation, DAFT and small-teacher tuning on the same data from the same pretrained start,
measures clean / corruption / PGD accuracy, mCE relative to the clean twin and training
time, extracts 4-bit group-128 signatures (projection and plain difference) from each
robust model against its clean twin, applies them to the clean model and measures the gain.
:func:`comparison_markdown` renders the result. ``ComparisonConfig.tiny()`` runs in about a
minute on 2 CPU cores.

Every trainer takes ``device`` (default: CUDA when available, else CPU); data stays on the
CPU and batches move to the device. Images are ``(N, C, H, W)`` tensors, uint8 or float in
[0, 1]; models normalise internally (see :mod:`robustpatch.lab.models`). All trainers go
through :func:`robustpatch.lab.training.train` and share its data order (order generator
seeded with ``TrainConfig.seed``) and, by default, its optimiser (SGD with momentum, step
decay), so two models trained with the same :class:`~robustpatch.lab.recipes.TrainConfig`
from the same start see the same batches -- the condition under which robust weight
signatures transfer. DAFT's adversarial head and small-teacher's linear probe use Adam
(``training.adam``); the pretrainings (:func:`robustpatch.lab.models.fit`) AdamW with a
one-cycle schedule.
"""

from __future__ import annotations

from ..training import LossFn
from .common import (
    AttackConfig,
    corruption_loss,
    cross_entropy_loss,
    features_and_logits,
    pgd_loss,
    pgd_maximize,
    train_with_loss,
)
from .comparison import COLUMNS, METHODS, ComparisonConfig, compare_methods, comparison_markdown
from .daft import (
    DOMAINS,
    DAFTConfig,
    DomainConfig,
    HeadConfig,
    adversarial_head,
    distill,
    distillation_loss,
    domain_generalization,
    render_domain,
)
from .nonrobustness import (
    DiscrepancyConfig,
    TransferConfig,
    adversarial_finetune,
    discrepancy_finetune,
    discrepancy_loss,
    nonrobustness_transfer,
)
from .small_teacher import (
    AugMixConfig,
    PartialTuneConfig,
    SmallTeacherConfig,
    augmix,
    augmix_finetune,
    augmix_loss,
    linear_probe_accuracy,
    robustify_with_small_teacher,
    select_parameters,
    small_teacher_study,
)

__all__ = [
    "AttackConfig",
    "DiscrepancyConfig",
    "TransferConfig",
    "HeadConfig",
    "DAFTConfig",
    "DomainConfig",
    "AugMixConfig",
    "PartialTuneConfig",
    "SmallTeacherConfig",
    "ComparisonConfig",
    "LossFn",
    "DOMAINS",
    "METHODS",
    "COLUMNS",
    "features_and_logits",
    "pgd_maximize",
    "train_with_loss",
    "cross_entropy_loss",
    "corruption_loss",
    "pgd_loss",
    "discrepancy_loss",
    "adversarial_finetune",
    "discrepancy_finetune",
    "nonrobustness_transfer",
    "render_domain",
    "adversarial_head",
    "distillation_loss",
    "distill",
    "domain_generalization",
    "augmix",
    "augmix_loss",
    "augmix_finetune",
    "select_parameters",
    "robustify_with_small_teacher",
    "linear_probe_accuracy",
    "small_teacher_study",
    "compare_methods",
    "comparison_markdown",
]
