"""DP-SGD across processes (2 CPU processes, gloo) against the single-process step.

Each process clips its share of the logical batch; the clipped sums are all-reduced; the noise
N(0, σ²C²) is drawn once for the whole group (by rank 0) and the sum is divided by the global
expected batch size B. The accountant counts the global sample rate q = B/N.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dpexp.accounting import Ledger
from dpexp.clipping import make_engine
from dpexp.data import PoissonBatchSampler
from dpexp.distributed import close_process_group
from dpexp.errors import UserError
from dpexp.privacy.step import GradientStep
from dpexp.train import build
from tests import reference

WORLD = 2
C = 0.5
B = 8.0  # expected logical batch size (global)
Q = 0.25


def model_and_batch() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The same float64 model and global batch in every process (fixed seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 40), nn.Tanh(), nn.Linear(40, 30)).double()
    x = torch.randn(11, 3, 2, 2, dtype=torch.float64)
    y = torch.arange(11) % 30
    return model, x, y


def dp_step(model: nn.Module, sigma: float, seed: int = 1) -> GradientStep:
    return GradientStep(
        model,
        engine=make_engine("per_sample", model),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=B,
        sample_rate=Q,
        ledger=Ledger(1e-5, "rdp"),
        noise_generator=torch.Generator().manual_seed(seed),
    )


def released_updates(sigma: float, steps: int) -> tuple[list[dict[str, torch.Tensor]], dict]:
    """This process's share of the batch through ``steps`` DP steps (SGD, lr 1, weights reset
    each step): the update each step applied, and the ledger history."""
    model, x, y = model_and_batch()
    mine = torch.arange(len(y)) % dist.get_world_size() == dist.get_rank()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step = dp_step(model, sigma)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    updates = []
    with step.engine.attached_to_model():
        for _ in range(steps):
            step((x[mine], y[mine]), optimizer)
            with torch.no_grad():
                updates.append({n: start[n] - p for n, p in model.named_parameters()})
                for n, p in model.named_parameters():
                    p.copy_(start[n])
    return updates, step.ledger.history()


def plain_update() -> dict[str, torch.Tensor]:
    """The non-private step (no clipping, no noise) on this process's share, SGD with lr 1."""
    model, x, y = model_and_batch()
    mine = torch.arange(len(y)) % dist.get_world_size() == dist.get_rank()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    GradientStep(model)((x[mine], y[mine]), torch.optim.SGD(model.parameters(), lr=1.0))
    return {n: start[n] - p.detach() for n, p in model.named_parameters()}


PROC_TASKS = Path("/proc/self/task")  # one entry per thread of this process (Linux)


def threads() -> int:
    return len(list(PROC_TASKS.iterdir())) if PROC_TASKS.is_dir() else 0


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    threads_before = threads()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    runs = {
        "clean": released_updates(0.0, steps=1),
        "noisy": released_updates(2.0, steps=3),
        "plain": plain_update(),
    }
    close_process_group()
    runs["threads"] = (threads_before, threads())
    torch.save(runs, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> list[dict]:
    """Per rank: a noiseless DP step, 3 noisy ones and a non-private step (one spawn: it is
    the slow part)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(
        _worker, args=(str(out / "pg"), str(out)), nprocs=WORLD, join=True, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_update_equals_single_process_brute_force_without_noise(two_process_runs):
    clean = [r["clean"] for r in two_process_runs]
    model, x, y = model_and_batch()
    expected, _ = reference.clipped_sum(model, x, y, C)  # one backward per sample, all 11
    for updates, _ in clean:  # every rank applies the same update
        for n, g in expected.items():
            torch.testing.assert_close(updates[0][n], g / B, rtol=1e-10, atol=1e-15)


def test_noise_is_drawn_once_for_the_group(two_process_runs):
    clean = [r["clean"] for r in two_process_runs]
    (rank0, _), (rank1, _) = [r["noisy"] for r in two_process_runs]
    signal = clean[0][0][0]
    residuals = []
    for step_update, other_rank in zip(rank0, rank1, strict=True):
        for n, g in step_update.items():
            torch.testing.assert_close(other_rank[n], g, rtol=0, atol=0)  # ranks agree exactly
            residuals.append(((g - signal[n]) * B).flatten())  # the noise of the summed gradient
    noise = torch.cat(residuals)
    sigma_c = 2.0 * C
    n = len(noise)  # 3 steps × 1750 coordinates
    # std within 5 % of σC (its standard error is σC/√(2n) ≈ 1 %), far from √2·σC
    assert noise.std().item() == pytest.approx(sigma_c, rel=0.05)
    assert noise.mean().abs().item() < 4 * sigma_c / math.sqrt(n)


def test_accountant_counts_the_global_sample_rate_once_per_step(two_process_runs):
    for _, history in [r["noisy"] for r in two_process_runs]:
        assert history == [(2.0, Q, 3)]


def test_non_private_step_is_the_global_mean_gradient(two_process_runs):
    model, x, y = model_and_batch()
    loss = torch.nn.functional.cross_entropy(model(x), y)  # mean over all 11 examples
    names = [n for n, _ in model.named_parameters()]
    expected = dict(zip(names, torch.autograd.grad(loss, list(model.parameters())), strict=True))
    for run in two_process_runs:
        for n, g in expected.items():
            torch.testing.assert_close(run["plain"][n], g, rtol=1e-10, atol=1e-15)


@pytest.mark.skipif(not PROC_TASKS.is_dir(), reason="counts threads in /proc")
def test_closing_the_group_joins_gloo_threads(two_process_runs):
    """After close_process_group no gloo thread is left to outlive Python: at interpreter
    shutdown one would release a collective's tensor, need the GIL, and abort the worker
    (SIGABRT, "terminate called without an active exception"). Without the close, a bare
    all_reduce-then-exit worker aborted in 27 of 80 trials (scripts/gloo_shutdown.py)."""
    for run in two_process_runs:
        before, after = run["threads"]
        assert after == before


def test_ranks_split_one_global_poisson_batch():
    """Every rank draws the same global mask and keeps its residue class of indices."""
    n, steps = 101, 20
    single = list(PoissonBatchSampler(n, 0.3, steps, torch.Generator().manual_seed(5)))
    shards = [
        list(PoissonBatchSampler(n, 0.3, steps, torch.Generator().manual_seed(5), r, WORLD))
        for r in range(WORLD)
    ]
    for t, batch in enumerate(single):
        parts = [shard[t] for shard in shards]
        assert set(parts[0].tolist()).isdisjoint(parts[1].tolist())
        assert sorted(torch.cat(parts).tolist()) == batch.tolist()


def test_lightning_ddp_spawn_trains_like_one_process(tiny_cfg, tmp_path):
    """trainer=ddp_spawn_cpu (2 processes, gloo) through the real config: the same weights as
    one process (same global Poisson batches, same noise, drawn once), and the main process
    reports the ledger the workers filled (q = B/N of the global batch)."""
    trained = {}
    for trainer_cfg in ("cpu", "ddp_spawn_cpu"):
        cfg = tiny_cfg(
            f"trainer={trainer_cfg}", "callbacks=none", "privacy.accountant=rdp",
            "trainer.max_epochs=2", "optimizer.lr=2.0",
        )  # fmt: skip
        L.seed_everything(cfg.seed, verbose=False)
        datamodule, module, privacy, _, trainer = build(cfg, tmp_path / trainer_cfg)
        start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
        trainer.fit(module, datamodule=datamodule)
        trained[trainer_cfg] = (module.model.state_dict(), privacy.summary(), start)
    (single, single_summary, start), (ddp, ddp_summary, _) = trained.values()
    assert ddp_summary["steps"] == single_summary["steps"] == 8
    assert ddp_summary["accountant_history"] == single_summary["accountant_history"]
    assert ddp_summary["accountant_history"] == [(single_summary["noise_multiplier"], 0.25, 8)]
    assert ddp_summary["epsilon"] == pytest.approx(single_summary["epsilon"], rel=1e-12)
    moved = max((single[n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-3  # the comparison below is not between untrained models
    for n, w in single.items():  # float32 sums in another order: equal to rounding
        torch.testing.assert_close(ddp[n], w, rtol=1e-4, atol=1e-5)


def test_a_spawn_strategy_that_would_lose_the_ledger_is_refused(tiny_cfg, tmp_path):
    """Lightning's own spawn launcher returns no callback state: the main process would write
    epsilon 0 for a trained model. The privacy callback refuses it by name."""
    lightning_spawn = "trainer.strategy._target_=lightning.pytorch.strategies.DDPStrategy"
    cfg = tiny_cfg("trainer=ddp_spawn_cpu", lightning_spawn)
    _, module, privacy, _, trainer = build(cfg, tmp_path / "run")
    with pytest.raises(UserError, match="DDPSpawnStrategy"):
        privacy.setup(trainer, module, "fit")
