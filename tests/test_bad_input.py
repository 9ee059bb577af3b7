"""Bad input: every case fails before anything is loaded or written, with exit code 2 and one
line naming the key, the bad value and what is allowed (no traceback unless --debug).

The case table below is also the source of docs/results/bad_input.md; regenerate it with
``DPEXP_WRITE_DOCS=1 pytest tests/test_bad_input.py -k doc``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator
from torch import nn

import dpexp.data.sources
from dpexp.errors import UserError
from dpexp.models import BUILDERS, build_model
from dpexp.results import RESULT_FILE, write_json_atomic
from dpexp.train import run
from dpexp.validate import validate
from tests.conftest import TINY, TINY_DATA, compose_config

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "results" / "bad_input.md"
Setup = Callable[[Path, pytest.MonkeyPatch], list[str]]


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, in words (for the doc)
    overrides: tuple[str, ...]
    match: str  # regex the one-line message must match: key, bad value, what is allowed
    setup: Setup | None = None  # builds files / patches; returns extra overrides
    stage: str = "validate"  # "validate": dpexp.validate.validate; "run": dpexp.train.run
    data: tuple[str, ...] = tuple(TINY_DATA)


# -- setups -----------------------------------------------------------------------------------
def _garbage_ckpt(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """ckpt_path= a file of 256 random bytes"""
    (work / "garbage.ckpt").write_bytes(os.urandom(256))
    return [f"ckpt_path={work / 'garbage.ckpt'}"]


def _save_model_ckpt(work: Path, model: nn.Module) -> list[str]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "global_step": 3}, work / "other.ckpt")
    return [f"ckpt_path={work / 'other.ckpt'}"]


def _ckpt_other_width(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """ckpt_path= a checkpoint of cnn_tanh with width=2"""
    return _save_model_ckpt(work, build_model("cnn_tanh", (1, 16, 16), 10, width=2))


def _ckpt_other_model(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """ckpt_path= a checkpoint of cnn_cifar"""
    return _save_model_ckpt(work, build_model("cnn_cifar", (1, 16, 16), 10))


def _ckpt_not_lightning(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """ckpt_path= torch.save({"weights": tensor})"""
    torch.save({"weights": torch.zeros(3)}, work / "plain.pt")
    return [f"ckpt_path={work / 'plain.pt'}"]


def _no_dataset(work: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """dataset=mnist, dataset.root and the mirror (dpexp.data.sources.MIRROR) empty folders"""
    (work / "empty").mkdir()
    monkeypatch.setattr(
        dpexp.data.sources, "MIRROR", work / "empty"
    )  # the repo's mirror is not seen
    return [f"dataset.root={work / 'empty'}"]


def _empty_root_beside_mirror(work: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """dataset=mnist, dataset.root an empty folder, the mirror (MIRROR) holding MNIST/raw/"""
    (work / "empty").mkdir()
    (work / "mirror" / "MNIST" / "raw").mkdir(parents=True)
    (work / "mirror" / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"")
    monkeypatch.setattr(dpexp.data.sources, "MIRROR", work / "mirror")
    return [f"dataset.root={work / 'empty'}"]


class _DroppedScale(nn.Module):
    """A learned scale with dropout inside its own forward: only a replay could give its
    per-sample gradients, and a replay cannot draw the same dropout mask."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(size))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x * self.scale)


def _dropout_in_generic_layer(image_shape, num_classes, **_) -> nn.Module:
    return nn.Sequential(nn.Flatten(), _DroppedScale(256), nn.Linear(256, num_classes))


def _unclippable_model(work: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """a module with a learned scale and dropout in its own forward"""
    monkeypatch.setitem(BUILDERS, "cnn_tanh", _dropout_in_generic_layer)
    return []


def _reflect_padded(image_shape, num_classes, **_) -> nn.Module:
    conv = nn.Conv2d(image_shape[0], 4, 3, padding=1, padding_mode="reflect")
    return nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(4 * 16 * 16, num_classes))


def _reflect_padded_model(work: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """the model's first layer is a Conv2d with padding_mode='reflect'"""
    monkeypatch.setitem(BUILDERS, "cnn_tanh", _reflect_padded)
    return []


def _no_gpu(work: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """a machine without a GPU (Lightning sees neither CUDA nor MPS)"""
    for accelerator in (CUDAAccelerator, MPSAccelerator):
        monkeypatch.setattr(accelerator, "is_available", staticmethod(lambda: False))
    return []


def _finished_run(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """the run dir holds result.json"""
    write_json_atomic(work / "run" / RESULT_FILE, {"test_acc": 0.5})
    return []


def _unfinished_run(work: Path, _: pytest.MonkeyPatch) -> list[str]:
    """the run dir holds a (truncated) checkpoints/last.ckpt, no result.json"""
    (work / "run" / "checkpoints").mkdir(parents=True)
    (work / "run" / "checkpoints" / "last.ckpt").write_bytes(b"a killed run's checkpoint")
    return []


# The tiny config has N = 128 private examples, B = 32, δ = 1e-3.
CASES = [
    Case("eps_zero", "ε = 0", ("privacy.epsilon=0",), r"privacy\.epsilon=0\.0 .*finite number > 0"),
    Case("eps_negative", "ε < 0", ("privacy.epsilon=-1",), r"privacy\.epsilon=-1\.0 .*> 0"),
    Case("eps_inf", "ε = ∞", ("privacy.epsilon=inf",), r"privacy\.epsilon=inf .*finite"),
    Case("eps_text", "ε not a number", ("privacy.epsilon=abc",), r"epsilon='abc' .*a number"),
    Case(
        "eps_none", "neither ε nor σ", ("privacy.epsilon=null",),
        r"privacy\.epsilon=None .*set epsilon .*noise_multiplier",
    ),
    Case("delta_zero", "δ = 0", ("privacy.delta=0",), r"privacy\.delta=0\.0 .*\(0, 1\)"),
    Case("delta_one", "δ = 1", ("privacy.delta=1",), r"privacy\.delta=1\.0 .*\(0, 1\)"),
    Case("delta_negative", "δ < 0", ("privacy.delta=-1e-5",), r"privacy\.delta=-1e-05 .*\(0, 1\)"),
    Case(
        "delta_large", "δ ≥ 1/N", ("privacy.delta=0.01",),
        r"privacy\.delta=0\.01 .*< 1/N = 0\.0078.*N=128.*allow_large_delta",
    ),
    Case(
        "sigma_negative", "σ < 0", ("privacy.noise_multiplier=-1",),
        r"privacy\.noise_multiplier=-1\.0 .*>= 0",
    ),
    Case(
        "sigma_zero", "σ = 0 outside an audit", ("privacy.noise_multiplier=0",),
        r"privacy\.noise_multiplier=0\.0 .*allow_no_noise",
    ),
    Case("clip_zero", "C = 0", ("privacy.max_grad_norm=0",), r"max_grad_norm=0\.0 .*> 0"),
    Case("accountant", "unknown accountant", ("privacy.accountant=gdp",), r"'gdp' .*prv, rdp"),
    Case(
        "lightning_clip", "Lightning's (non-per-sample) clipping under DP",
        ("trainer.gradient_clip_val=1.0",), r"gradient_clip_val=1\.0 .*max_grad_norm",
    ),
    Case("batch_zero", "B = 0", ("dataset.batch_size=0",), r"batch_size=0 .*positive integer"),
    Case(
        "batch_too_large", "B > N", ("dataset.batch_size=1000",),
        r"dataset\.batch_size=1000 .*at most .* 128",
    ),
    Case(
        "public_too_large", "held-out public split ≥ whole training set",
        ("public.source=heldout", "public.size=128"), r"public\.size=128 .*\[1, 127\]",
    ),
    Case(
        "physical_negative", "physical batch < 0", ("dataset.physical_batch_size=-4",),
        r"physical_batch_size=-4 .*positive integer",
    ),
    Case("seed_negative", "seed < 0", ("seed=-1",), r"seed=-1 .*integer >= 0"),
    Case("model_unknown", "unknown model", ("model.name=vgg",), r"model\.name='vgg' .*cnn_tanh"),
    Case(
        "model_unbuildable", "a model the images cannot feed (scattering scale 2^5 > 16 px)",
        ("model.name=scatternet", "+model.J=5"),
        r"model='scatternet' .*cannot be built as configured: .*2\^J",
    ),
    Case(
        "clipping_unknown", "unknown clipping mode", ("clipping.mode=fast",),
        r"clipping\.mode='fast' .*per_sample.*ghost",
    ),
    Case(
        "clipping_unsupported", "a clipping mode the model breaks (dropout in a generic layer)",
        ("clipping=bk",), r"clipping\.mode='bk' .*random operation.*functorch", _unclippable_model,
    ),
    Case(
        "clipping_reference_blind_spot",
        "clipping=per_sample on a layer Opacus' hooks get wrong (reflect padding)",
        ("clipping=per_sample",),
        r"clipping\.mode='per_sample' .*'0' \(Conv2d\): padding_mode='reflect' .*"
        r"use clipping=functorch or auto, exact for it$",
        _reflect_padded_model,
    ),
    Case(
        "epochs_zero", "no step planned", ("trainer.max_epochs=0",),
        r"trainer\.max_epochs=0 .*positive integer",
    ),
    Case(
        "lr_negative", "learning rate < 0", ("optimizer.lr=-1",),
        r"^optimizer\.lr=-1 is invalid: torch\.optim\.SGD refused it "
        r"\(Invalid learning rate: -1\)$",
    ),
    Case(
        "momentum_negative", "momentum < 0", ("optimizer.momentum=-3",),
        r"^optimizer\.momentum=-3 is invalid: torch\.optim\.SGD refused it "
        r"\(Invalid momentum value: -3\)$",
    ),
    Case(
        "adam_beta", "Adam β₁ ≥ 1", ("optimizer=adam", "+optimizer.betas=[1.5,0.9]"),
        r"^optimizer\.betas=\[1\.5, 0\.9\] is invalid: torch\.optim\.Adam refused it "
        r"\(Invalid beta parameter at index 0: 1\.5\)$",
    ),
    Case(
        "accelerator_absent", "trainer on a GPU the machine does not have",
        ("trainer.accelerator=gpu",),
        r"^trainer\.accelerator='gpu' is invalid: lightning\.Trainer refused it "
        r"\(No supported gpu backend found!\)$",
        _no_gpu,
    ),
    Case(
        "trainer_unknown_option", "misspelt Trainer argument", ("+trainer.max_epoch=3",),
        r"^trainer\.max_epoch=3 is invalid: lightning\.Trainer refused it "
        r"\(.*unexpected keyword argument 'max_epoch'\)$",
    ),
    Case(
        "scheduler_horizon_zero", "cosine schedule over 0 steps",
        ("scheduler=cosine", "scheduler.T_max=0"),
        r"^scheduler is invalid: torch\.optim\.lr_scheduler\.CosineAnnealingLR refused its "
        r"settings \(integer modulo by zero\)$",
    ),
    Case(
        "scheduler_unknown_option", "an option the scheduler does not have",
        ("scheduler=cosine", "+scheduler.warmup_steps=100"),
        r"^scheduler\.warmup_steps=100 is invalid: torch\.optim\.lr_scheduler\."
        r"CosineAnnealingLR refused it \(.*unexpected keyword argument 'warmup_steps'\)$",
    ),
    Case(
        "checkpoint_interval_negative", "checkpoint every −1 steps",
        ("callbacks.step_checkpoint.every_n_train_steps=-1",),
        r"^callbacks\.step_checkpoint\.every_n_train_steps=-1 is invalid: "
        r"lightning\.pytorch\.callbacks\.ModelCheckpoint refused it "
        r"\(Invalid value for every_n_train_steps=-1\. Must be >= 0\)$",
    ),
    Case(
        "logger_unknown_option", "an option the CSV logger does not have",
        ("logger=csv", "+logger.csv.flush_every=10"),
        r"^logger\.csv\.flush_every=10 is invalid: lightning\.pytorch\.loggers\.CSVLogger "
        r"refused it \(.*unexpected keyword argument 'flush_every'\)$",
    ),
    Case(
        "wandb_offline_log_model", "W&B offline but asked to upload checkpoints",
        ("logger=wandb", "logger.wandb.offline=true", "logger.wandb.log_model=true"),
        r"^logger\.wandb is invalid: lightning\.pytorch\.loggers\.WandbLogger refused its "
        r"settings \(Providing log_model=True and offline=True is an invalid configuration",
    ),
    Case(
        "pruning_rate_one", "pruning rate 1 (nothing trains)",
        ("method=freeze", "pruning.rate=1.0"),
        r"pruning\.rate=1\.0 .*\[0, 1\)",
    ),
    Case(
        "pruning_rate_negative", "pruning rate < 0", ("method=freeze", "pruning.rate=-0.1"),
        r"pruning\.rate=-0\.1 .*\[0, 1\)",
    ),
    Case(
        "select_rate", "selection rate > 1", ("method=select", "select.rate=1.5"),
        r"select\.rate=1\.5 .*\[0, 1\)",
    ),
    Case(
        "scores_on_private_data", "pruning scores from gradients on private data (no public split)",
        ("method=freeze", "pruning.scorer=public_grad"),
        r"pruning\.scorer='public_grad' .*public\.source='none'.*not accounted",
    ),
    Case(
        "screen_private_validation", "un-noised screening test on private data",
        ("method=screen", "screen.validation=private"),
        r"screen\.validation='private' .*leaks.*private_noisy",
    ),
    Case(
        "dataset_missing", "dataset absent from root and mirror, no network", (),
        r"dataset 'mnist' not found in .*empty: .*MNIST/raw.*DPEXP_DATA_ROOT or dataset\.root",
        _no_dataset, data=("dataset=mnist", "dataset.train_size=256", "dataset.batch_size=32"),
    ),
    Case(
        "dataset_root_empty", "dataset.root set to an empty folder (the mirror has the data)", (),
        r"dataset 'mnist' not found in .*empty: .*mirror .* only for the default root 'data'$",
        _empty_root_beside_mirror,
        data=("dataset=mnist", "dataset.train_size=256", "dataset.batch_size=32"),
    ),
    Case(
        "ckpt_missing", "checkpoint file does not exist", ("ckpt_path=/nonexistent/last.ckpt",),
        r"ckpt_path='/nonexistent/last\.ckpt' .*existing Lightning checkpoint",
    ),
    Case(
        "ckpt_garbage", "checkpoint is random bytes", (),
        r"ckpt_path='.*garbage\.ckpt' .*readable checkpoint.*corrupt", _garbage_ckpt,
    ),
    Case(
        "ckpt_not_lightning", "checkpoint is a plain tensor file", (),
        r"ckpt_path='.*plain\.pt' .*Lightning checkpoint \(no state_dict", _ckpt_not_lightning,
    ),
    Case(
        "ckpt_other_width", "checkpoint of the same model at another width", (),
        r"ckpt_path=.* model 'cnn_tanh' as configured: "
        r"model\.features\.0\.weight has shape \[32, 1, 8, 8\] .* \[16, 1, 8, 8\] in the model",
        _ckpt_other_width,
    ),
    Case(
        "ckpt_other_model", "checkpoint of another architecture", (),
        r"ckpt_path=.* model 'cnn_tanh'", _ckpt_other_model,
    ),
    Case(
        "finished_run", "run dir already holds a result.json", (),
        r"result\.json already exists: this run is complete; choose another hydra\.run\.dir",
        _finished_run, "run",
    ),
    Case(
        "unfinished_run", "run dir holds a killed run's checkpoint, resume not asked", (),
        r"resume=false is invalid here: .*last\.ckpt exists .*resume=true",
        _unfinished_run, "run",
    ),
    Case(
        "resume_truncated", "resume=true but last.ckpt was cut short by a kill",
        ("resume=true",), r"resume='.*last\.ckpt' is invalid: a readable checkpoint",
        _unfinished_run, "run",
    ),
]  # fmt: skip
MESSAGES: dict[str, str] = {}  # case id -> message, shared with the doc test


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _message(case: Case, work: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    work.mkdir(parents=True, exist_ok=True)
    extra = case.setup(work, monkeypatch) if case.setup else []
    cfg = compose_config(work / "run", *case.data, *TINY, *case.overrides, *extra)
    before = _snapshot(work)
    with pytest.raises(UserError) as info:
        validate(cfg) if case.stage == "validate" else run(cfg, work / "run")
    assert _snapshot(work) == before, "bad input must not write anything"
    message = str(info.value)
    MESSAGES[case.id] = message.replace(str(work), "<tmp>")
    return message


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(case, tmp_path, monkeypatch):
    message = _message(case, tmp_path, monkeypatch)
    assert "\n" not in message
    assert re.search(case.match, message), message


# -- through the real command line ------------------------------------------------------------
@dataclass(frozen=True)
class CliCase:
    id: str
    what: str
    args: tuple[str, ...]
    match: str
    in_existing_run: bool = True  # point hydra.run.dir at a finished run that must not change
    setup: Setup | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


CLI_CASES = [
    CliCase(
        "cli_unknown_group_option", "unknown config group option", ("dataset=foo",),
        r"^dpexp: error: dataset='foo' is invalid: no such config; choose one of .*synthetic$",
    ),
    CliCase(
        "cli_unknown_key", "misspelt key", ("privacy.epsilonn=3",),
        r"^dpexp: error: Could not override 'privacy\.epsilonn'.*\+privacy\.epsilonn=3",
    ),
    CliCase(
        "cli_bad_delta", "δ = 1 aimed at a finished run's dir", (*TINY_DATA, "privacy.delta=1"),
        r"^dpexp: error: privacy\.delta=1\.0 is invalid: a number in \(0, 1\)$",
    ),
    CliCase(
        "cli_lr_negative", "learning rate < 0 aimed at a finished run's dir",
        (*TINY_DATA, *TINY, "optimizer.lr=-1"),
        r"^dpexp: error: optimizer\.lr=-1 is invalid: torch\.optim\.SGD refused it",
    ),
    CliCase(
        "cli_checkpoint_interval", "checkpoint every −1 steps, new run dir",
        (*TINY_DATA, *TINY, "callbacks.step_checkpoint.every_n_train_steps=-1"),
        r"^dpexp: error: callbacks\.step_checkpoint\.every_n_train_steps=-1 is invalid",
        in_existing_run=False,
    ),
    CliCase(
        "cli_garbage_ckpt", "checkpoint is random bytes", (*TINY_DATA, *TINY),
        r"^dpexp: error: ckpt_path='.*garbage\.ckpt' is invalid: a readable checkpoint",
        in_existing_run=False, setup=_garbage_ckpt,
    ),
]  # fmt: skip


def _existing_run(root: Path) -> Path:
    """A finished run's dir, as a previous `python -m dpexp.train` left it."""
    run_dir = root / "finished"
    write_json_atomic(run_dir / RESULT_FILE, {"test_acc": 0.5, "epsilon": 1.0})
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"weights")
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (run_dir / "train.log").write_text("log of the finished run\n")
    return run_dir


def _cli(args: list[str], cwd: Path, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "DPEXP_DEBUG")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    command = [sys.executable, "-m", "dpexp.train", *args, *(["--debug"] if debug else [])]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(case, tmp_path):
    extra = case.setup(tmp_path, pytest.MonkeyPatch()) if case.setup else []
    run_dir = _existing_run(tmp_path) if case.in_existing_run else tmp_path / "new"
    before = _snapshot(run_dir) if run_dir.exists() else None
    done = _cli([*case.args, *extra, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert re.search(case.match, lines[0]), lines[0]
    if before is None:
        assert not run_dir.exists()  # nothing created
    else:
        assert _snapshot(run_dir) == before  # nothing in the finished run changed
    MESSAGES[case.id] = lines[0].replace(str(tmp_path), "<tmp>")


# -- and no refusal of good input --------------------------------------------------------------
def _shipped(group: str) -> list[str]:
    return sorted(f"{group}={p.stem}" for p in (REPO / "conf" / group).glob("*.yaml"))


SHIPPED = [
    o for g in ("optimizer", "scheduler", "trainer", "logger", "callbacks") for o in _shipped(g)
]
GPU_TRAINERS = {"trainer=gpu", "trainer=ddp_spawn"}  # accelerator: gpu


@pytest.mark.parametrize("option", SHIPPED)
def test_every_shipped_option_passes_the_checks(option, tmp_path, monkeypatch):
    """Building the objects must not refuse a config the repo ships (a GPU trainer is refused
    only where no GPU is visible, naming trainer.accelerator); nothing is written either way."""
    tiny = [o for o in TINY if not o.startswith("trainer.accelerator=")]  # the option's own
    cfg = compose_config(tmp_path / "run", *TINY_DATA, *tiny, option)
    if option in GPU_TRAINERS:
        _no_gpu(tmp_path, monkeypatch)
        with pytest.raises(UserError, match=r"^trainer\.accelerator='gpu' is invalid"):
            validate(cfg)
    else:
        validate(cfg)
    assert not any(tmp_path.iterdir()), "validation must not write anything"


def test_debug_keeps_the_traceback(tmp_path):
    done = _cli([*TINY_DATA, "privacy.delta=1", f"hydra.run.dir={tmp_path / 'r'}"], tmp_path, True)
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "dpexp.errors.ConfigError" in done.stderr
    assert not (tmp_path / "r").exists()


# -- the table in docs/results/bad_input.md ---------------------------------------------------
def render_doc() -> str:
    lines = [
        "# Bad input: one clear line, exit code 2, nothing written",
        "",
        "Generated by `tests/test_bad_input.py` from its case table (each row is a test; the",
        "message is the one the test observed). Regenerate with",
        "`DPEXP_WRITE_DOCS=1 .venv/bin/python -m pytest tests/test_bad_input.py`.",
        "Stage *validate* calls `dpexp.validate.validate(cfg)`, *run* calls `dpexp.train.run`, on",
        "the tiny config (synthetic N=128, B=32, δ=1e-3); each also checks that nothing was",
        "written. *CLI* runs `python -m dpexp.train` and checks exit code 2, exactly one stderr",
        "line, no traceback, and that the finished run dir it aimed at is byte-for-byte unchanged",
        "(or that no run dir was created). The CLI prints every message above the same way:",
        "`dpexp: error: <message>`; `--debug` or `HYDRA_FULL_ERROR=1` keep the traceback.",
        "`<tmp>` is the test's temporary folder.",
        "",
        "| # | case | stage | bad input | overrides / setup | message |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(c.id, c.stage, c.what, c.overrides, c.setup) for c in CASES]
    rows += [(c.id, "CLI", c.what, c.args, c.setup) for c in CLI_CASES]
    for i, (case_id, stage, what, overrides, setup) in enumerate(rows, 1):
        shown = " ".join(f"`{o}`" for o in overrides if o not in TINY_DATA + TINY)
        if setup is not None:
            shown = f"{shown} {setup.__doc__}".strip()
        message = MESSAGES[case_id].replace("|", "\\|")
        lines.append(f"| {i} | {case_id} | {stage} | {what} | {shown} | {message} |")
    return "\n".join(lines) + "\n"


def test_doc_table_is_current(tmp_path, monkeypatch):
    for case in CASES:  # when run alone (-k doc), fill in what the case tests would have seen
        if case.id not in MESSAGES:
            with pytest.MonkeyPatch.context() as patch:
                _message(case, tmp_path / case.id, patch)
    missing = [c.id for c in CLI_CASES if c.id not in MESSAGES]
    if missing:
        pytest.skip(f"CLI cases {missing} did not run in this session")
    text = render_doc()
    if os.environ.get("DPEXP_WRITE_DOCS") == "1":
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/results/bad_input.md is stale: DPEXP_WRITE_DOCS=1"
