"""recipes.train(distributed=True): two gloo ranks on CPU (torch.multiprocessing) end with
identical weights and BatchNorm statistics, and the loss falls."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from robustpatch.lab import models, recipes, training  # noqa: E402

pytestmark = pytest.mark.torch

WORLD = 2


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes: class 1 has a bright square in the middle."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(192) % 2
    x = torch.rand(192, 3, 16, 16, generator=g) * 0.5
    x[y == 1, :, 4:12, 4:12] += 0.5
    return x, y


def _model() -> torch.nn.Module:
    return models.SmallCNN(num_classes=2, widths=(4, 8, 8), seed=0)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = _data()
        model = _model()
        losses: list[float] = []
        config = recipes.TrainConfig(epochs=3, lr=0.05, batch_size=16, milestones=[2], seed=0)
        recipes.train(
            model,
            x,
            y,
            config,
            transform=lambda xb, gen: (xb + 0.05 * torch.rand(xb.shape, generator=gen)).clamp(0, 1),
            device=torch.device("cpu"),
            progress=lambda _epoch, loss: losses.append(loss),
            distributed=True,
        )
        order = training._rank_order(len(x), 0, config.seed, rank, WORLD)
        torch.save(
            {"state": model.state_dict(), "losses": losses, "order": order},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_identical_and_the_loss_falls(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    a, b = got[0]["state"], got[1]["state"]
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between ranks"
    # Training moved the weights away from the start...
    start = _model().state_dict()
    assert not torch.equal(a["features.0.weight"], start["features.0.weight"])
    assert not torch.equal(a["features.1.running_mean"], start["features.1.running_mean"])
    # ...the loss (mean over both ranks, so the same on each) fell...
    la, lb = got[0]["losses"], got[1]["losses"]
    assert la == lb and len(la) == 3
    # last / first epoch loss with data, model and order seeded 0-4: 0.06, 0.08, 0.19, 0.07, 0.17
    assert la[-1] < 0.7 * la[0], la
    # ...and each rank trained on its own half of every epoch.
    oa, ob = got[0]["order"], got[1]["order"]
    assert len(oa) == len(ob) == 96
    assert sorted(torch.cat([oa, ob]).tolist()) == list(range(192))


def test_distributed_needs_a_process_group():
    x, y = _data()
    with pytest.raises(RuntimeError, match="process group"):
        recipes.train(
            _model(),
            x[:8],
            y[:8],
            recipes.TrainConfig(epochs=1),
            device=torch.device("cpu"),
            distributed=True,
        )
