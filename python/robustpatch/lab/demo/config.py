"""The demo's sizes and the choices fixed before any run (corruptions, arm, policy)."""

from __future__ import annotations

from dataclasses import dataclass

from .. import experiments as X
from .. import recipes

SEVERITIES = X.SEVERITIES
# One of each family: noise, blur, weather, digital.
DEMO_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "fog", "contrast")
FAMILIES = {
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur"),
    "weather": ("snow", "frost", "fog", "brightness", "spatter"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"),
}
# ImageNet-C strengths: at CIFAR-C strengths, digits barely suffer.
SCALE = "imagenet"
# The arm every claim is judged on, fixed before any run: the shallow projection
# signature (first layers within the parameter budget), α = 1, BatchNorm re-estimated.
PRIMARY = "shallow|reestimate"
POLICY = "reestimate"


@dataclass
class DemoConfig:
    """Sizes of one demo run; :meth:`quick` fits in minutes on 2 CPU cores."""

    pretrain_images: int = 8000
    pretrain_epochs: int = 6
    finetune: recipes.TrainConfig = None  # type: ignore[assignment]
    corruptions: tuple[str, ...] = DEMO_CORRUPTIONS
    # Share of the parameters the shallow signature may touch (leading layers).
    budget: float = 0.25
    bits: int = 4
    seed: int = 0
    # A second fine-tune seed for the similarity experiment (None: skipped).
    second_seed: int | None = 1
    # Fine-tune seeds (seed, seed + 1, ...) on which claim 2's arm is measured again, to
    # give its numbers a spread and a 95% interval (below 2: skipped).
    replicates: int = 3
    # Procedural-patterns images (train, test) for the transfer experiment (0: skipped).
    transfer_images: tuple[int, int] = (3000, 1000)
    test_images: int | None = None  # cap on digits test images (None: all 359)
    bn_images: int = 500  # unlabeled images for BatchNorm re-estimation
    alphas: tuple[float, ...] = X.ALPHAS
    bit_range: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    composition: bool = True
    save_files: bool = True  # checkpoints and signature files under files/
    depth_ks: tuple[int, ...] | None = None  # layer counts of the depth sweep (None: all)
    # Extra signatures beside shallow, shallow quantized and full (projection).
    variants: tuple[str, ...] = ("shallow-difference", "budget-by-difference", "full-difference")
    # The five robustifiers compared (lab.robustifiers): "tiny", "default" or None (skipped).
    robustifiers: str | None = "default"

    def __post_init__(self) -> None:
        self.check()
        if self.finetune is None:
            self.finetune = recipes.TrainConfig(
                epochs=8, lr=0.02, batch_size=64, milestones=[5, 7], seed=self.seed
            )

    def check(self) -> None:
        """Refuse settings that would fail only after the training (the config is mutable,
        so :func:`.runner.run` checks again before it starts)."""
        if self.second_seed is not None and self.second_seed == self.seed:
            # its signatures would overwrite the first seed's under the same labels
            raise ValueError(
                f"second_seed must differ from seed ({self.seed}), or be None to skip the "
                "similarity experiment"
            )

    @classmethod
    def quick(cls) -> DemoConfig:
        """Under ten minutes on 2 quiet CPU cores (see the report for measured times)."""
        return cls(
            pretrain_images=4000,
            pretrain_epochs=4,
            finetune=recipes.TrainConfig(epochs=5, lr=0.02, batch_size=64, milestones=[3, 4]),
            transfer_images=(1500, 500),
            robustifiers="tiny",
        )

    @classmethod
    def tiny(cls) -> DemoConfig:
        """Seconds, for tests: every stage and the report at a miniature size."""
        return cls(
            pretrain_images=1000,
            pretrain_epochs=2,
            finetune=recipes.TrainConfig(epochs=3, lr=0.02, batch_size=64, milestones=[2]),
            corruptions=("gaussian_noise", "contrast"),
            second_seed=None,
            replicates=2,
            transfer_images=(600, 200),
            test_images=200,
            bn_images=200,
            alphas=(0.0, 0.5, 1.0),
            bit_range=(2, 4, 8),
            depth_ks=(1,),
            variants=(),
            robustifiers=None,
        )
