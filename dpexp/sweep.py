"""Multirun jobs: deterministic directories, skipping finished jobs, clean restarts of killed ones.

A sweep directory is ``multirun/<task_name>`` (plus a timestamp only with ``sweep_stamp=true``)
and each job's directory is named from its overrides, so re-running the same command finds the
same job directories. :func:`prepare_job` then returns the result of a finished job instead of
training it again, and readies the directory of an unfinished one: an interrupted attempt of
the same job (same identity) is continued from its ``checkpoints/last.ckpt``, anything else is
cleared so the job starts from scratch.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dpexp.errors import ConfigError, UserError
from dpexp.preemption import HPC_CHECKPOINTS
from dpexp.results import read_result, write_json_atomic

# Written when a multirun job starts: what the job is, so a later re-run can tell whether a
# finished result in this directory belongs to the same configuration.
JOB_FILE = "job.json"
# Left behind by a killed job; removed before it trains again from scratch.
PARTIAL_ARTIFACTS = ("checkpoints", "csv", "tensorboard", "wandb")
# What an interrupted attempt continues from (the run dir's own checkpoint, as resume=true).
CHECKPOINT = Path("checkpoints") / "last.ckpt"

# Keys that change how a job is run or logged but not what it computes.
NOT_IDENTITY = (
    "logger",
    "callbacks",
    "resume",
    "ckpt_path",
    "sweep_stamp",
    "task_name",
    "trainer.enable_progress_bar",
)
# Job directory names stay well below the 255-byte limit of common file systems.
MAX_DIRNAME = 160
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+~-]")


def sweep_stamp(enabled: bool, now: str) -> str:
    """Suffix of the sweep directory: ``/<now>`` when ``sweep_stamp=true``, else nothing."""
    return f"/{now}" if enabled else ""


def split_items(override_dirname: str) -> list[str]:
    """Hydra's ``k=v,k=v`` string back into items; commas inside brackets or quotes stay."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(override_dirname):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(override_dirname[start:i])
            start = i + 1
    items.append(override_dirname[start:])
    return [item for item in items if item]


def _short_key(key: str, leaves: list[str]) -> str:
    """``dataset.train_size`` → ``train_size`` when no other override has that leaf."""
    prefix = key[: len(key) - len(key.lstrip("+~"))]
    leaf = key.rsplit(".", 1)[-1]
    return prefix + leaf if leaves.count(leaf) == 1 else key


def job_dirname(override_dirname: str) -> str:
    """A short, file-system- and shell-safe directory name from Hydra's ``override_dirname``.

    Keys are shortened to their last component where that stays unambiguous; characters
    outside ``[A-Za-z0-9._,=+~-]`` become ``_``; names still too long are truncated and
    suffixed with a hash of the full text, so distinct jobs keep distinct directories."""
    pairs = [item.partition("=") for item in split_items(override_dirname)]
    leaves = [key.lstrip("+~").rsplit(".", 1)[-1] for key, _, _ in pairs]
    short = ",".join(f"{_short_key(k, leaves)}{sep}{v}" for k, sep, v in pairs)
    name = _UNSAFE.sub("_", short) or "defaults"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
        name = f"{name[: MAX_DIRNAME - 13]}-{digest}"
    return name


def grid_job_dirnames(args: list[str]) -> list[str]:
    """The job directory names ``python -m dpexp.train -m <args>`` creates with the basic
    sweeper: the composed config's ``hydra.sweeper.params`` (an experiment's grid) with
    ``args`` on top, each job named as Hydra's ``override_dirname`` and :func:`job_dirname`."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dpexp.train import CONFIG_DIR

    parser = OverridesParser.create()
    fixed = [o.input_line for o in parser.parse_overrides(args) if not o.is_sweep_override()]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=fixed, return_hydra_config=True)
    GlobalHydra.instance().clear()
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None) or {}
    grid = [f"{key}={value}" for key, value in params.items()] + list(args)
    naming = cfg.hydra.job.config.override_dirname
    exclude = list(naming.exclude_keys)
    jobs = BasicSweeper.split_arguments(parser.parse_overrides(grid), None)[0]
    return [
        job_dirname(
            get_overrides_dirname(
                parser.parse_overrides(job), exclude, naming.item_sep, naming.kv_sep
            )
        )
        for job in jobs
    ]


def register_resolvers() -> None:
    """Resolvers used by conf/hydra/default.yaml (idempotent)."""
    for name, fn in (("dpexp.stamp", sweep_stamp), ("dpexp.dirname", job_dirname)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the config that decides what a job computes (unresolved, no paths)."""
    container = OmegaConf.to_container(cfg, resolve=False)
    for key in ("paths", "hydra"):  # run-local; hydra is present only in composed test configs
        container.pop(key, None)
    # Parameter averaging changes test_acc; absent (like no scheduler) it leaves the hash as
    # it was before these options existed, so older sweeps still resume.
    averaging = (container.get("callbacks") or {}).get("ema")
    if not container.get("scheduler"):
        container.pop("scheduler", None)
    for key in NOT_IDENTITY:
        *parents, leaf = key.split(".")
        node = container
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    if averaging is not None:
        container["averaging"] = averaging
    return container


def identity_hash(cfg: DictConfig) -> str:
    text = json.dumps(identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_job(job_dir: Path) -> dict[str, Any] | None:
    """The job record written when the job started, or None."""
    try:
        return json.loads((Path(job_dir) / JOB_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def prepare_job(cfg: DictConfig, job_dir: Path, overrides: list[str]) -> dict[str, Any] | None:
    """Called for each multirun job before training.

    Returns the job's result when ``result.json`` is complete (the job is skipped). Otherwise
    the job runs: when ``job.json`` shows that an interrupted attempt of the same job (same
    identity) left ``checkpoints/last.ckpt``, everything is kept and :func:`resumes` is true
    (the job continues from it, through the same checks as ``resume=true``); otherwise the
    leftovers are removed so it starts from scratch. Raises :class:`UserError` when the
    finished result was produced by a different configuration."""
    job_dir = Path(job_dir)
    wanted = identity_hash(cfg)
    recorded = (read_job(job_dir) or {}).get("identity_hash")
    result = read_result(job_dir)
    if result is not None:
        if recorded not in (None, wanted):
            raise UserError(
                f"{job_dir}: finished with a different configuration (identity {recorded}, "
                f"now {wanted}); start a fresh sweep with sweep_stamp=true or task_name=<new>"
            )
        return result
    same_job = recorded == wanted or (recorded is None and bool(cfg.get("resume")))
    own_attempt = same_job and (job_dir / CHECKPOINT).is_file()
    if not own_attempt:
        for name in PARTIAL_ARTIFACTS:
            shutil.rmtree(job_dir / name, ignore_errors=True)
        for path in job_dir.glob(HPC_CHECKPOINTS):  # Lightning would load one silently
            path.unlink()
    write_json_atomic(
        job_dir / JOB_FILE,
        {
            "identity_hash": wanted,
            "overrides": list(overrides),
            "config": OmegaConf.to_container(cfg, resolve=False),
        },
    )
    return None


def resumes(job_dir: Path) -> bool:
    """After :func:`prepare_job`: the job continues an interrupted attempt of its own."""
    return (Path(job_dir) / CHECKPOINT).is_file()


def _is_multi_device(devices: Any) -> bool:
    """Lightning's ``devices``: an int (-1 = all), a list of ids, or a string of either."""
    if isinstance(devices, str):
        text = devices.strip().strip(",")
        if "," in text:
            return True
        devices = int(text) if text.lstrip("-").isdigit() else 1  # "auto": one device or unknown
    if isinstance(devices, int):
        return devices == -1 or devices > 1
    return devices is not None and len(devices) > 1


def _starts_by_spawn(strategy: Any) -> bool:
    """A strategy name (``ddp_spawn``) or an instantiable DDPStrategy node (``start_method``)."""
    if isinstance(strategy, str):
        return "spawn" in strategy or "fork" in strategy
    return strategy.get("start_method", "popen") in ("spawn", "fork", "forkserver")


def check_strategy(cfg: DictConfig) -> None:
    """Inside a multirun, a multi-device Lightning job must start its workers by spawn/fork.

    Lightning's default ``ddp`` (popen) re-executes the command line for every extra rank;
    under ``-m`` that command is the whole sweep, so each rank would launch the sweep again."""
    trainer = cfg.get("trainer") or {}
    strategy = trainer.get("strategy", "auto")
    if not _is_multi_device(trainer.get("devices", 1)) or _starts_by_spawn(strategy):
        return
    raise ConfigError(
        f"trainer.strategy={strategy!r} is invalid: with trainer.devices="
        f"{trainer.get('devices')} inside a multirun use a spawn strategy "
        "(trainer=ddp_spawn, or trainer.strategy=ddp_spawn)"
    )
