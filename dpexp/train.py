"""Hydra entry point: compose → validate → build → fit → test → result.json.

python -m dpexp.train privacy.epsilon=1 trainer.max_epochs=5
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

from dpexp import sweep, tracking
from dpexp.errors import UserError
from dpexp.methods import build_methods
from dpexp.module import Classifier
from dpexp.privacy import PrivacyCallback
from dpexp.results import RESULT_FILE, config_hash, git_sha, read_result, write_json_atomic
from dpexp.validate import validate

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger(__name__)

# Known, harmless library warnings that would otherwise bury the progress bar.
for message in (
    "Full backward hook is firing when gradients are computed with respect to module outputs",
    "Optimal order is the largest alpha",
    ".*isinstance.treespec, LeafSpec. is deprecated",
    "The number of training batches .* is smaller than the logging interval",
):
    warnings.filterwarnings("ignore", message=message)


def build(cfg: DictConfig, output_dir: Path):
    """Instantiate data, model, methods, privacy callback, module and trainer from ``cfg``."""
    datamodule = instantiate(cfg.dataset)
    model = instantiate(cfg.model)
    methods = build_methods(cfg)
    privacy = PrivacyCallback(
        enabled=bool(cfg.privacy.enabled),
        epsilon=cfg.privacy.epsilon,
        delta=cfg.privacy.delta,
        max_grad_norm=cfg.privacy.max_grad_norm,
        accountant=cfg.privacy.accountant or "prv",
        noise_multiplier=cfg.privacy.noise_multiplier,
        clipping=cfg.clipping.mode,
        methods=methods,
        seed=cfg.seed,
    )
    module = Classifier(model, instantiate(cfg.optimizer), methods)
    callbacks = [*methods, privacy, *[instantiate(c) for c in (cfg.callbacks or {}).values()]]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, privacy, methods, trainer


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = output_dir / "checkpoints" / "last.ckpt"
    return str(last) if cfg.get("resume") and last.is_file() else None


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    """Train and test one configuration; write and return its result."""
    datamodule = validate(cfg)
    if read_result(output_dir) is not None:
        raise UserError(
            f"{output_dir / RESULT_FILE} already exists: this run is complete; "
            "choose another hydra.run.dir to train again"
        )
    ckpt_path = resume_checkpoint(cfg, output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    datamodule, module, privacy, methods, trainer = build(cfg, output_dir)
    tracking.log_config(trainer.loggers, cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    model = module.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fractions = [f for m in methods if (f := m.trainable_fraction(model)) is not None]
    result: dict[str, Any] = {
        "test_acc": float(test["test/acc"]),
        "test_loss": float(test["test/loss"]),
        **privacy.summary(),
        "epochs": trainer.current_epoch,
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "n_params": n_params,
        "trainable_fraction": min(fractions) if fractions else n_trainable / n_params,
        "wall_s": round(time.perf_counter() - start, 2),
        "seed": cfg.seed,
        "git_sha": git_sha(),
        "config_hash": config_hash(cfg),
        "run_dir": str(output_dir),
    }
    for method in methods:
        result.update(method.result_fields())
    tracking.log_result(trainer.loggers, result, step=trainer.global_step)
    write_json_atomic(output_dir / RESULT_FILE, result)
    return result


def summary_line(result: dict[str, Any]) -> str:
    eps = result["epsilon"]
    privacy = f"epsilon={eps:.3f} delta={result['delta']:g}" if eps is not None else "non-private"
    return (
        f"test_acc={result['test_acc']:.4f} {privacy} steps={result['steps']} "
        f"method={result['method']} clipping={result['clipping']} wall={result['wall_s']:.0f}s"
    )


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # In a multirun a finished job is skipped (its result reused), so an interrupted sweep
    # resumes by re-running it; a single run still refuses to overwrite a finished one.
    finished = None
    try:
        if sweep.in_multirun():
            sweep.check_strategy(cfg)
            overrides = list(HydraConfig.get().overrides.task)
            finished = sweep.prepare_job(cfg, output_dir, overrides)
        result = finished or run(cfg, output_dir)
    except UserError as exc:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"dpexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        tracking.finish_wandb()  # multirun jobs sharing a process must not share a W&B run
    print(f"{'skipped, already complete' if finished else 'run dir'}: {output_dir}")
    print(summary_line(result))
    return result["test_acc"]


def main() -> None:
    """Console script ``dpexp-train``; ``--debug`` keeps full tracebacks."""
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
        os.environ["HYDRA_FULL_ERROR"] = "1"
    hydra_main()


if __name__ == "__main__":
    main()
