"""The Lightning callback that owns DP-SGD: noise calibration, clipping engine, noise RNG,
accountant, the budget stop and their checkpoint state."""

from __future__ import annotations

import logging
import math
import secrets
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

from dpexp import accounting
from dpexp.accounting import Ledger
from dpexp.clipping import make_engine
from dpexp.errors import UserError
from dpexp.methods.base import Method
from dpexp.privacy.settings import check_resume
from dpexp.privacy.step import GradientStep
from dpexp.results import write_json_atomic

log = logging.getLogger(__name__)
# the engine's per-layer decisions, written into the run dir after the first step
PLAN_FILE = "clipping_plan.json"


def planned_steps(trainer: L.Trainer, steps_per_epoch: int) -> int:
    """Optimizer steps the trainer will run, from max_epochs/max_steps/limit_train_batches."""
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        per_epoch = min(limit, steps_per_epoch)
    else:
        per_epoch = int(steps_per_epoch * limit) if limit < 1 else steps_per_epoch
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    steps = epochs * per_epoch if epochs is not None else None
    if trainer.max_steps is not None and trainer.max_steps > 0:
        steps = trainer.max_steps if steps is None else min(steps, trainer.max_steps)
    if steps is None:
        raise ValueError("set trainer.max_epochs or trainer.max_steps: DP needs a step plan")
    return steps


class PrivacyCallback(L.Callback):
    """DP-SGD (``enabled=True``) or the non-private baseline through the same step.

    ``epsilon`` is the target and the hard budget: σ is calibrated so that the planned steps
    spend at most ε, and training stops before any step that would exceed it. With
    ``noise_multiplier`` given, σ is fixed and ε is computed (still capped by ``epsilon``
    unless that is None).

    Noise and sampling are reproducible from ``seed`` by default (research: anyone holding
    the result file can regenerate the noise, so it is not a private release). With
    ``secure_noise`` their seeds, and those of method randomness that touches private data,
    come from the OS CSPRNG, are never stored, and the noise is drawn as Opacus' secure
    mode draws it (docs/reliability.md).
    """

    def __init__(
        self,
        enabled: bool = True,
        epsilon: float | None = 3.0,
        delta: float = 1e-5,
        max_grad_norm: float = 1.0,
        accountant: str = "prv",
        noise_multiplier: float | None = None,
        clipping: str = "per_sample",
        methods: list[Method] | None = None,
        seed: int = 0,
        verify: bool = True,
        secure_noise: bool = False,
        settings: dict[str, Any] | None = None,
        plan_file: str | Path | None = None,
    ) -> None:
        self.enabled = enabled
        self.epsilon = epsilon
        self.delta = delta
        self.max_grad_norm = max_grad_norm
        self.accountant = accountant
        self.fixed_noise_multiplier = noise_multiplier
        self.noise_multiplier: float | None = None
        self.clipping = clipping
        self.methods = list(methods or [])
        self.seed = seed
        self.verify = verify
        self.secure_noise = bool(secure_noise)
        # drawn once here, so that every DDP worker (pickled from this object) shares them
        self._secret_seeds = [secrets.randbits(63) for _ in range(3)] if secure_noise else None
        self.settings = settings
        self.verification = None
        self.ledger = Ledger(delta, accountant)
        self.step: GradientStep | None = None
        self.engine = None
        self.noise_generator: torch.Generator | None = None
        self.sample_rate = math.nan
        self.planned_steps = 0
        self._restored_steps = 0
        self._restored_noise_state: torch.Tensor | None = None
        self.budget_exhausted = False
        self.plan_file = Path(plan_file) if plan_file is not None else None
        self._plan_reported = 0  # decisions already written

    @property
    def state_key(self) -> str:
        return "PrivacyCallback"

    def extra_mechanisms(self) -> list[accounting.Mechanism]:
        return [m for method in self.methods for m in method.privacy_mechanisms()]

    # -- before the optimizer exists -------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        launcher = getattr(trainer.strategy, "launcher", None)
        if isinstance(launcher, _MultiProcessingLauncher) and not getattr(
            launcher, "returns_callback_state", False
        ):  # the main process would report an empty ledger: epsilon 0 for a trained model
            raise UserError(
                "trainer.strategy: a spawn/fork DDP strategy must be "
                "dpexp.distributed.DDPSpawnStrategy (trainer=ddp_spawn_cpu), which returns the "
                "privacy ledger to the process that writes result.json"
            )
        dm = trainer.datamodule
        if self._secret_seeds is not None:
            dm.use_secret_sampler_seed(self._secret_seeds[0])
            for method in self.methods:
                method.use_secret_seed(self._secret_seeds[2])
        for method in self.methods:
            method.setup_method(pl_module.model, dm)
        self.sample_rate = dm.sample_rate
        self.planned_steps = planned_steps(trainer, dm.steps_per_epoch)
        if not self.enabled:
            return
        if self.fixed_noise_multiplier is not None:
            self.noise_multiplier = float(self.fixed_noise_multiplier)
        else:  # a few seconds with nothing to count: said before, not after
            log.info("DP-SGD: calibrating sigma to epsilon=%g over %d steps (%s)",
                     self.epsilon, self.planned_steps, self.accountant)  # fmt: skip
            self.noise_multiplier = accounting.noise_multiplier(
                self.epsilon,
                self.sample_rate,
                self.planned_steps,
                self.delta,
                self.accountant,
                extra_mechanisms=self.extra_mechanisms(),
            )
        log.info(
            "DP-SGD: sigma=%.4f q=%.6f steps=%d C=%g delta=%g accountant=%s",
            self.noise_multiplier,
            self.sample_rate,
            self.planned_steps,
            self.max_grad_norm,
            self.delta,
            self.accountant,
        )

    # -- model on its device, checkpoint restored ------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model
        dm = trainer.datamodule
        kwargs: dict[str, Any] = {}
        if self.enabled:
            device = next(model.parameters()).device
            seed = self._secret_seeds[1] if self._secret_seeds else self.seed + 1
            self.noise_generator = torch.Generator(device=device).manual_seed(seed)
            if self._restored_noise_state is not None:
                self.noise_generator.set_state(self._restored_noise_state)
            self.engine = make_engine(self.clipping, model)
            self.engine.attach()
            kwargs = {
                "engine": self.engine,
                "noise_multiplier": self.noise_multiplier,
                "max_grad_norm": self.max_grad_norm,
                "expected_batch_size": dm.batch_size,
                "sample_rate": self.sample_rate,
                "physical_batch_size": dm.physical_batch_size,
                "ledger": self.ledger,
                "noise_generator": self.noise_generator,
                "verify": self.verify,
                "secure_noise": self.secure_noise,
            }
        self.step = GradientStep(model, self.methods, **kwargs)
        self.step.steps = self._restored_steps
        pl_module.gradient_step = self.step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.epsilon is None:
            return
        remaining = max(self.planned_steps - self.step.steps, 0)
        allowed = self.ledger.steps_within_budget(self.step.mechanisms(), self.epsilon, remaining)
        self.step.max_steps = self.step.steps + allowed
        if allowed == 0 and remaining > 0:  # e.g. resumed with a smaller epsilon
            self.budget_exhausted = True
            trainer.should_stop = True
            log.warning(
                "privacy budget epsilon=%g already spent after %d steps (epsilon=%.4f): "
                "stopping without training",
                self.epsilon,
                self.step.steps,
                self.ledger.epsilon(),
            )
        elif allowed < remaining:
            log.warning(
                "budget epsilon=%g allows %d of the %d remaining steps; will stop there",
                self.epsilon,
                allowed,
                remaining,
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._report_plan(trainer)
        if self.step is not None and not self.step.budget_allows_step():
            self.budget_exhausted = self.step.steps < self.planned_steps
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.enabled:
            pl_module.log("epsilon", self.spent_epsilon(), prog_bar=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._report_plan(trainer)  # decisions for input shapes first seen after step one
        if self.engine is not None and self.engine.attached:
            self.engine.detach()

    def _report_plan(self, trainer: L.Trainer) -> None:
        """The clipping engine's plan: one INFO line the first time, every per-layer decision
        in ``plan_file`` (rewritten when a new input shape adds decisions)."""
        plan = getattr(self.engine, "plan", None)
        if not plan or len(plan) == self._plan_reported:
            return
        where = ""
        if self.plan_file is not None and trainer.is_global_zero:
            write_json_atomic(self.plan_file, {"clipping": self.clipping, "decisions": plan})
            where = f" (plan in {self.plan_file})"
        if self._plan_reported == 0:
            log.info("clipping=%s: %s%s", self.clipping, self.engine.plan_summary(), where)
        self._plan_reported = len(plan)

    # -- results and checkpoints ------------------------------------------------------
    def spent_epsilon(self) -> float:
        return self.ledger.epsilon() if self.enabled else math.inf

    @property
    def noise_label(self) -> str | None:
        if not self.enabled:
            return None
        if self.secure_noise:
            return "secure: seeds from the OS CSPRNG, never stored"
        return "reproducible from seed — not a private release"

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.spent_epsilon() if self.enabled else None,
            "delta": self.delta if self.enabled else None,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.step.steps if self.step else self._restored_steps,
            "planned_steps": self.planned_steps,
            "accountant": self.accountant if self.enabled else None,
            "accountant_history": self.ledger.history(),
            "max_grad_norm": self.max_grad_norm if self.enabled else None,
            "clipping": self.clipping if self.enabled else None,
            "clipping_probe": self._probe_report(),
            "noise": self.noise_label,
            "budget_stop": self.budget_exhausted,
        }

    def _probe_report(self) -> dict[str, Any] | None:
        """The exactness probe's outcome (from the step, or as a DDP worker returned it)."""
        if self.step is not None and self.step.verification is not None:
            return self.step.verification.as_dict()
        return self.verification

    def state_dict(self) -> dict[str, Any]:
        keep_noise = self.noise_generator is not None and not self.secure_noise
        return {
            "ledger": self.ledger.state_dict(),
            "steps": self.step.steps if self.step else self._restored_steps,
            "noise_multiplier": self.noise_multiplier,
            # a secret generator's state would let a checkpoint's reader recompute the noise
            "noise_generator": self.noise_generator.get_state() if keep_noise else None,
            "settings": self.settings,
        }

    # -- DDP via spawn (dpexp.distributed): training runs in worker processes ---------------
    def worker_state(self) -> dict[str, Any]:
        """What rank 0 sends back so that the main process reports the run it trained."""
        return {
            "checkpoint": self.state_dict(),
            "summary": self.summary(),
            "verification": self._probe_report(),
        }

    def restore_worker_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["checkpoint"])
        summary = state["summary"]
        self.noise_multiplier = summary["noise_multiplier"]
        self.sample_rate = summary["sample_rate"]
        self.planned_steps = summary["planned_steps"]
        self.budget_exhausted = summary["budget_stop"]
        self.verification = state.get("verification")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.settings is not None:  # None: a bare callback (tests, DDP state transfer)
            check_resume(state_dict.get("settings"), self.settings, "the resumed checkpoint")
        self.ledger.load_state_dict(state_dict["ledger"])
        self._restored_steps = state_dict["steps"]
        self._restored_noise_state = state_dict["noise_generator"]
        saved_sigma = state_dict["noise_multiplier"]
        comparable = self.enabled and None not in (saved_sigma, self.noise_multiplier)
        if comparable and not math.isclose(saved_sigma, self.noise_multiplier, rel_tol=1e-9):
            raise UserError(
                f"ckpt_path: checkpoint was trained with noise_multiplier={saved_sigma:.6g} but "
                f"this config gives {self.noise_multiplier:.6g}; resume with the same privacy "
                "settings and step plan"
            )
