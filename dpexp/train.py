"""Hydra entry point: compose → validate → build → fit → test → result.json.

python -m dpexp.train privacy.epsilon=1 trainer.max_epochs=5
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import (
    ConfigCompositionException,
    HydraException,
    MissingConfigException,
    OverrideParseException,
)
from hydra.experimental.callback import Callback as HydraCallback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dpexp import pretrain, progress, quiet, sweep, tracking, tuning
from dpexp.averaging import ParameterEMA
from dpexp.data import public_kwargs
from dpexp.errors import UserError
from dpexp.methods import build_methods
from dpexp.models import RUN_WEIGHTS, init_fields, save_weights
from dpexp.module import Classifier
from dpexp.privacy import PLAN_FILE, PrivacyCallback
from dpexp.privacy.settings import privacy_settings
from dpexp.results import (
    RESULT_FILE,
    config_hash,
    git_sha,
    hardware,
    read_result,
    write_json_atomic,
)
from dpexp.validate import check_checkpoint, validate

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger(__name__)

quiet.install()  # known, harmless third-party messages (dpexp/quiet.py)


def build(cfg: DictConfig, output_dir: Path):
    """Instantiate data, model, methods, privacy callback, module and trainer from ``cfg``."""
    progress.enable(bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True)))
    datamodule = instantiate(cfg.dataset, **public_kwargs(cfg))
    model = instantiate(cfg.model)
    if (features := getattr(model, "fixed_features", None)) is not None:
        # a fixed per-example transform: computed once (and cached), not at every step
        datamodule.precompute(features, cfg.paths.get("feature_cache"))
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
        verify=bool(cfg.clipping.get("verify", True)),
        secure_noise=bool(cfg.privacy.get("secure_noise")),
        settings=privacy_settings(cfg),
        plan_file=output_dir / PLAN_FILE,
    )
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = Classifier(
        model, instantiate(cfg.optimizer), methods, scheduler, private_stats_logged(cfg)
    )
    extra = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    callbacks = [*methods, privacy, *extra]  # callbacks.<name>=null turns one off
    loggers = [instantiate(c) for c in tracking.logger_configs(cfg).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return datamodule, module, privacy, methods, trainer


def private_stats_logged(cfg: DictConfig) -> bool:
    """Do the logs hold statistics of private batches? Always for a non-private run."""
    return not cfg.privacy.enabled or bool(OmegaConf.select(cfg, "logger.private_stats"))


def resume_checkpoint(cfg: DictConfig, output_dir: Path, own_attempt: bool = False) -> str | None:
    """The checkpoint to continue from; refuses to start over another run's checkpoints.

    ``own_attempt``: a multirun job continues its own interrupted attempt (dpexp.sweep), from
    its ``last.ckpt`` as with ``resume=true``, whatever ``resume`` and ``ckpt_path`` say."""
    last = output_dir / "checkpoints" / "last.ckpt"
    if own_attempt:
        check_checkpoint(cfg, last, key="resume")
        log.info("continuing the interrupted attempt from %s", last)
        return str(last)
    if cfg.get("ckpt_path"):
        ckpt = Path(cfg.ckpt_path)
        if last.is_file() and ckpt.resolve() != last.resolve():
            raise UserError(
                f"ckpt_path={str(ckpt)!r} is invalid here: {last} already holds this run "
                "dir's own checkpoint; resume it with resume=true or choose another hydra.run.dir"
            )
        return str(ckpt)
    if cfg.get("resume"):
        if not last.is_file():
            log.warning("resume=true but %s does not exist: starting from scratch", last)
            return None
        check_checkpoint(cfg, last, key="resume")  # e.g. truncated by a kill during the save
        return str(last)
    if last.is_file():
        raise UserError(
            f"resume=false is invalid here: {last} exists (an unfinished run); pass "
            "resume=true to continue it, or choose another hydra.run.dir"
        )
    return None


def check_run_dir(cfg: DictConfig, output_dir: Path, own_attempt: bool = False) -> str | None:
    """Refuse to write over a finished or unfinished run; return the checkpoint to resume."""
    if read_result(output_dir) is not None:
        raise UserError(
            f"{output_dir / RESULT_FILE} already exists: this run is complete; "
            "choose another hydra.run.dir to train again"
        )
    return resume_checkpoint(cfg, output_dir, own_attempt)


class Preflight(HydraCallback):
    """Validates the config and the run dir before Hydra creates or writes anything there
    (Hydra saves .hydra/*.yaml and opens train.log in the run dir before the task starts)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            HydraConfig.instance().set_config(config)
            validate(config)
            check_run_dir(config, Path(config.hydra.run.dir))
        except UserError as exc:
            # Hydra turns a callback's exception into a warning and goes on: exit here.
            if _debug():
                traceback.print_exc()
            print(f"dpexp: error: {exc}", file=sys.stderr)
            sys.exit(2)


def run(cfg: DictConfig, output_dir: Path, own_attempt: bool = False) -> dict[str, Any]:
    """Train and test one configuration; write and return its result (``own_attempt``: see
    :func:`resume_checkpoint`)."""
    datamodule = validate(cfg)
    ckpt_path = check_run_dir(cfg, output_dir, own_attempt)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    start = time.perf_counter()
    # the code and machine at the start: a checkout during a long run must not relabel it
    started_from = {"git_sha": git_sha(), "hardware": hardware()}
    datamodule, module, privacy, methods, trainer = build(cfg, output_dir)
    tracking.log_config(trainer.loggers, cfg)
    pretrained = pretrain_stage(cfg, module.model, datamodule, trainer, output_dir, ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    test = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    averaging = next((c for c in trainer.callbacks if isinstance(c, ParameterEMA)), None)
    test_last = test
    if averaging is not None and averaging.raw is not None:  # the model holds the average
        with averaging.last_iterate(module):
            test_last = trainer.test(module, datamodule=datamodule, verbose=False)[0]
    model = module.model
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fractions = [f for m in methods if (f := m.trainable_fraction(model)) is not None]
    result: dict[str, Any] = {
        "test_acc": float(test["test/acc"]),
        "test_loss": float(test["test/loss"]),
        "test_acc_last": float(test_last["test/acc"]),  # the last iterate, never averaged
        "test_loss_last": float(test_last["test/loss"]),
        "averaging": averaging.label if averaging is not None else "none",
        **privacy.summary(),
        "logs_contain_private_statistics": private_stats_logged(cfg),
        "epochs": trainer.current_epoch,
        "method": cfg.method.name,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "n_params": n_params,
        "trainable_fraction": min(fractions) if fractions else n_trainable / n_params,
        **init_fields(model),  # weights started from, head, trainable patterns
        **datamodule.public_fields(),  # public.source, public.size, how it was mapped
        **pretrained,
        "wall_s": round(time.perf_counter() - start, 2),
        "seed": cfg.seed,
        **started_from,
        "config_hash": config_hash(cfg),
        "run_dir": str(output_dir),
    }
    for method in methods:
        result.update(method.result_fields())
    if cfg.get("tuning"):  # one trial: its epsilon is not the privacy of the tuned result
        result["tuning"] = (
            f"one trial of a hyper-parameter search (tuning.accounting="
            f"{cfg.tuning.accounting}); what the search cost: the sweep dir's "
            f"{tuning.SUMMARY_FILE}"
        )
    tracking.log_result(trainer.loggers, result, step=trainer.global_step)
    # the model test_acc scored, for a later run's model.weights=<this run dir>
    provenance = {k: result[k] for k in ("model", "dataset", "config_hash")}
    save_weights(model, output_dir / RUN_WEIGHTS, provenance)
    write_json_atomic(output_dir / RESULT_FILE, result)
    return result


def pretrain_stage(
    cfg: DictConfig,
    model,
    datamodule,
    trainer: L.Trainer,
    output_dir: Path,
    ckpt_path: str | None,
) -> dict[str, Any]:
    """``pretrain.epochs`` > 0: non-private training on the public split, before the privacy
    callback attaches (dpexp/pretrain.py); returns its result.json fields."""
    epochs = int(OmegaConf.select(cfg, "pretrain.epochs") or 0)
    if not epochs:
        return {k: (0 if k == "pretrain_epochs" else None) for k in pretrain.FIELDS}
    lr = cfg.pretrain.lr
    optimizer = instantiate(cfg.optimizer, **({"lr": lr} if lr is not None else {}))
    return pretrain.run_stage(
        model,
        datamodule,
        output_dir,
        epochs,
        optimizer,
        lr=float(lr if lr is not None else cfg.optimizer.lr),
        batch_size=int(cfg.pretrain.batch_size),
        seed=int(cfg.seed),
        device=trainer.strategy.root_device,
        resuming=ckpt_path is not None,
    )


def summary_line(result: dict[str, Any]) -> str:
    eps = result["epsilon"]
    privacy = f"epsilon={eps:.3f} delta={result['delta']:g}" if eps is not None else "non-private"
    averaging = result.get("averaging", "none")
    last = f" test_acc_last={result['test_acc_last']:.4f}" if averaging != "none" else ""
    noise = f" noise: {result['noise']}" if result.get("noise") else ""
    return (
        f"test_acc={result['test_acc']:.4f}{last} averaging={averaging} {privacy} "
        f"steps={result['steps']} "
        f"method={result['method']} clipping={result['clipping']} wall={result['wall_s']:.0f}s"
        f"{noise}"
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
        own_attempt = finished is None and sweep.in_multirun() and sweep.resumes(output_dir)
        result = finished or run(cfg, output_dir, own_attempt)
    except UserError as exc:
        if _debug():
            raise
        print(f"dpexp: error: {exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        tracking.finish_wandb()  # multirun jobs sharing a process must not share a W&B run
    print(f"{'skipped, already complete' if finished else 'run dir'}: {output_dir}")
    print(summary_line(result))
    print(metrics_line(output_dir, sweep.in_multirun()))
    return result["test_acc"]


def metrics_line(output_dir: Path, multirun: bool = False) -> str:
    """Where the run's logged metrics are, and the one command that plots them."""
    csv, board = output_dir / "csv" / "metrics.csv", output_dir / "tensorboard"
    if multirun:  # the sweep's report collects every job
        where = f"metrics: {csv}" if csv.is_file() else f"result: {output_dir / RESULT_FILE}"
        return f"{where}; plot the sweep: python -m dpexp.report {output_dir.parent}"
    if csv.is_file():
        return f"metrics: {csv}; plot them: python -m dpexp.report {output_dir}"
    if board.is_dir():
        return f"metrics: {board}; plot them: tensorboard --logdir {board}"
    return f"metrics: none logged besides {output_dir / RESULT_FILE} (no csv logger)"


def _debug() -> bool:
    """Developers keep tracebacks: ``--debug`` or ``HYDRA_FULL_ERROR=1``."""
    flag = os.environ.get("DPEXP_DEBUG")  # set by main(), which takes over HYDRA_FULL_ERROR
    return flag == "1" if flag is not None else os.environ.get("HYDRA_FULL_ERROR") == "1"


def hydra_error_line(exc: HydraException) -> str:
    """Hydra's multi-line composition error as one line: key, bad value, what is allowed."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, name = exc.missing_cfg_file.rpartition("/")
        allowed = ", ".join(exc.options)
        return f"{group}={name!r} is invalid: no such config; choose one of {allowed}"
    text = str(exc).split("\nConfig search path:")[0]
    parts = [line.strip().rstrip(".") for line in text.splitlines() if line.strip()]
    if exc.__cause__ is not None and str(exc.__cause__).strip():
        parts.append(str(exc.__cause__).strip().splitlines()[0])
    return "; ".join(parts)


def main() -> None:
    """Console script ``dpexp-train``; ``--debug`` keeps full tracebacks."""
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or "--debug" in sys.argv
    if "--debug" in sys.argv:
        sys.argv.remove("--debug")
    saved = {k: os.environ.get(k) for k in ("DPEXP_DEBUG", "HYDRA_FULL_ERROR")}
    os.environ["DPEXP_DEBUG"] = "1" if debug else "0"
    # Hydra prints its own errors over several lines and exits; let them reach us instead.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except (ConfigCompositionException, OverrideParseException, UserError) as exc:
        if debug:
            raise
        line = str(exc) if isinstance(exc, UserError) else hydra_error_line(exc)
        print(f"dpexp: error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:  # leave the environment as found (main() may be called in-process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


if __name__ == "__main__":
    main()
