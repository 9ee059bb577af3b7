"""Resumes whose privacy-relevant settings differ from the checkpoint's are refused
(issue: privacy audit, item 6): the ledger in the checkpoint only describes its steps if
every step before and after the resume was the same mechanism."""

from __future__ import annotations

import pytest

from dpexp.errors import UserError
from dpexp.train import run

BASE = ("privacy.noise_multiplier=1.0", "trainer.max_epochs=1", "callbacks.ema=null")


def checkpoint_of(tiny_cfg, tmp_path, *overrides: str):
    run(tiny_cfg(*BASE, *overrides, output_dir=tmp_path / "first"), tmp_path / "first")
    return tmp_path / "first" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (("privacy.delta=1e-4",), "privacy.delta"),
        (("privacy.accountant=rdp",), "privacy.accountant"),
        (("privacy.max_grad_norm=0.5",), "privacy.max_grad_norm"),
        (("privacy.noise_multiplier=2.0",), "privacy.noise_multiplier"),
        (("privacy.secure_noise=true",), "privacy.secure_noise"),
        (("dataset.batch_size=16",), "sample_rate"),
        (("dataset.train_size=100",), "private_examples"),
        (("public.source=heldout", "public.size=28"), "private_examples"),
        (("method=freeze",), "the method or its options"),
        (("privacy=none",), "privacy.enabled"),
    ],
)
def test_a_changed_privacy_setting_refuses_the_resume(tiny_cfg, tmp_path, change, key):
    ckpt = checkpoint_of(tiny_cfg, tmp_path)
    before = ckpt.read_bytes()
    cfg = tiny_cfg(*BASE, "trainer.max_epochs=2", *change, f"ckpt_path={ckpt}",
                   output_dir=tmp_path / "second")  # fmt: skip
    with pytest.raises(UserError, match=rf"the checkpoint was trained with {key}="):
        run(cfg, tmp_path / "second")
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "second").exists()  # refused before anything was written


def test_a_dp_run_cannot_continue_a_non_private_checkpoint(tiny_cfg, tmp_path):
    """The audit's case: 12 steps reported as ε = 2.52 while the ledger held 4."""
    ckpt = checkpoint_of(tiny_cfg, tmp_path, "privacy=none")
    cfg = tiny_cfg(*BASE, "trainer.max_epochs=3", f"ckpt_path={ckpt}",
                   output_dir=tmp_path / "second")  # fmt: skip
    with pytest.raises(UserError, match=r"trained with privacy\.enabled=False, this run has True"):
        run(cfg, tmp_path / "second")


def test_method_options_are_part_of_the_settings(tiny_cfg, tmp_path):
    ckpt = checkpoint_of(tiny_cfg, tmp_path, "method=freeze", "pruning.rate=0.5")
    cfg = tiny_cfg(*BASE, "method=freeze", "pruning.rate=0.8", f"ckpt_path={ckpt}",
                   output_dir=tmp_path / "second")  # fmt: skip
    with pytest.raises(UserError, match=r"the method or its options="):
        run(cfg, tmp_path / "second")


def test_safe_changes_resume_and_the_ledger_continues(tiny_cfg, tmp_path):
    """Another exact clipping engine and more epochs with a fixed σ: same mechanism."""
    ckpt = checkpoint_of(tiny_cfg, tmp_path)
    first = run(tiny_cfg(*BASE, "trainer.max_epochs=2", output_dir=tmp_path / "straight"),
                tmp_path / "straight")  # fmt: skip
    cfg = tiny_cfg(*BASE, "trainer.max_epochs=2", "clipping=functorch", f"ckpt_path={ckpt}",
                   output_dir=tmp_path / "second")  # fmt: skip
    resumed = run(cfg, tmp_path / "second")
    assert resumed["steps"] == first["steps"]
    assert resumed["epsilon"] == pytest.approx(first["epsilon"], rel=1e-9)
    assert resumed["delta"] == first["delta"]


def test_resume_true_in_the_run_dir_checks_the_same_settings(tiny_cfg, tmp_path):
    """A killed run continued with resume=true and another δ: refused, not re-accounted."""
    run_dir = tmp_path / "first"
    ckpt = checkpoint_of(tiny_cfg, tmp_path)
    (run_dir / "result.json").unlink()  # as if killed after its last checkpoint
    cfg = tiny_cfg(*BASE, "trainer.max_epochs=2", "privacy.delta=1e-6", "resume=true",
                   output_dir=run_dir)  # fmt: skip
    with pytest.raises(UserError, match=r"resume=.* trained with privacy\.delta=0\.001"):
        run(cfg, run_dir)
    assert ckpt.is_file()
