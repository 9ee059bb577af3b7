"""The audit run: validate the ``audit`` options, train once with canaries, guess, bound, and
write ``audit.json``; ``python -m dpexp.audit [overrides]``."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from dpexp.audit.bound import guess_membership
from dpexp.audit.canaries import Canaries
from dpexp.audit.gradient_canaries import GradientCanaries
from dpexp.audit.input_canaries import InputCanaries
from dpexp.data import DataModule
from dpexp.errors import ConfigError, UserError
from dpexp.results import write_json_atomic
from dpexp.train import CONFIG_DIR, build
from dpexp.validate import validate

log = logging.getLogger(__name__)
AUDIT_FILE = "audit.json"
CANARY_TYPES = ("gradient", "input")


def guess_counts(m: int, fractions: list[float]) -> list[int]:
    """The numbers of guesses r tried, from fractions of the m canaries."""
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(
            f"audit.guess_fractions={fractions!r} is invalid: a non-empty list in (0, 1]"
        )
    return sorted({max(2, min(m, round(f * m))) for f in fractions})


def validate_audit(cfg: DictConfig) -> None:
    audit = cfg.get("audit")
    if audit is None:
        raise ConfigError("audit=None is invalid: compose the audit group (+audit=default)")
    if audit.canary_type not in CANARY_TYPES:
        raise ConfigError(
            f"audit.canary_type={audit.canary_type!r} is invalid: choose one of "
            f"{', '.join(CANARY_TYPES)}"
        )
    m = audit.canaries
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ConfigError(f"audit.canaries={m!r} is invalid: an integer >= 2")
    if not 0 < audit.confidence < 1:
        raise ConfigError(f"audit.confidence={audit.confidence!r} is invalid: in (0, 1)")
    window = audit.detrend_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 3 or window % 2 == 0:
        raise ConfigError(f"audit.detrend_window={window!r} is invalid: an odd integer >= 3")
    if not cfg.privacy.enabled:
        raise ConfigError("privacy.enabled=false is invalid for an audit: set privacy=dp")
    devices = cfg.trainer.get("devices", 1)
    if devices != 1 or cfg.trainer.get("num_nodes", 1) != 1:
        # every process would add its own canaries to the shared logical batch
        raise ConfigError(f"trainer.devices={devices!r} is invalid for an audit: 1 (one process)")
    guess_counts(m, list(audit.guess_fractions))


def make_canaries(cfg: DictConfig, datamodule: DataModule, model: nn.Module) -> Canaries:
    """The configured canaries. Input canaries get their classes in ``model``'s output layer
    and their members join the data module's private training set."""
    audit = cfg.audit
    if audit.canary_type == "gradient":
        return GradientCanaries(
            audit.canaries, audit.canary_norm, datamodule.sample_rate, audit.seed
        )
    canaries = InputCanaries(
        audit.canaries, datamodule.image_shape, datamodule.num_classes, audit.seed
    )
    canaries.use_model_inputs(datamodule.model_inputs(canaries.inputs))
    canaries.add_classes(model)
    datamodule.add_private_examples(*canaries.members())
    return canaries


def audit(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train the configured method with canaries; return (and write) the audit line."""
    validate_audit(cfg)
    datamodule = validate(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module, privacy, _, trainer = build(cfg, output_dir)
    canaries = make_canaries(cfg, datamodule, module.model)
    trainer.callbacks.append(canaries)  # after the privacy callback: its step exists
    if 2 * cfg.audit.canaries * privacy.delta > 0.1:
        log.warning(
            "2·m·δ = %.3g: the δ term of the bound is large and will hold the lower bound down; "
            "use fewer canaries or a smaller privacy.delta",
            2 * cfg.audit.canaries * privacy.delta,
        )
    trainer.fit(module, datamodule=datamodule)
    claimed = privacy.spent_epsilon()
    best = guess_membership(
        canaries.scores(cfg.audit.detrend_window),
        canaries.included.numpy(),
        guess_counts(cfg.audit.canaries, list(cfg.audit.guess_fractions)),
        privacy.delta,
        cfg.audit.confidence,
    )
    line = {
        "method": cfg.method.name,
        "clipping": cfg.clipping.mode,
        "canary_type": cfg.audit.canary_type,
        "epsilon_claimed": claimed if math.isfinite(claimed) else None,
        "epsilon_lower_bound": round(best.epsilon_lower_bound, 4),
        "confidence": cfg.audit.confidence,
        "trials": cfg.audit.canaries,
        "guesses": best.guesses,
        "correct": best.correct,
        "delta": privacy.delta,
        "noise_multiplier": privacy.noise_multiplier,
        "sample_rate": privacy.sample_rate,
        "score": best.score,
        "steps": len(canaries.released),
    }
    write_json_atomic(output_dir / AUDIT_FILE, line)
    return line


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        line = audit(cfg, output_dir)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dpexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(line))


def main() -> None:
    """``python -m dpexp.audit [overrides]``: the train config plus the ``audit`` group."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    given = sys.argv[1:]
    if not any(a.lstrip("+~").startswith("audit=") for a in given):
        given = ["+audit=default", *given]
    if not any(a.startswith("task_name=") for a in given):
        given = ["task_name=audit", *given]
    sys.argv[1:] = given
    hydra_main()
