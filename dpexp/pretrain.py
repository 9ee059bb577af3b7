"""Public pretraining: non-private training on the public split before private training.

A stage of ``dpexp.train.run`` (``pretrain.epochs`` > 0), run before the privacy callback
attaches: it reads only ``datamodule.public``, so it costs no privacy and the accountant is
unchanged. It trains the parameters private training will train (``requires_grad``), with the
run's optimizer (``conf/optimizer``) at ``pretrain.lr``, on shuffled public batches of
``pretrain.batch_size``, and leaves the weights in the run dir (:data:`PRETRAINED_WEIGHTS`),
where a later run can start from them (``model.weights=<run dir>/pretrained.safetensors``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dpexp.data import TensorData
from dpexp.methods.masks import stream_seed
from dpexp.models import PRETRAINED_WEIGHTS, save_weights

log = logging.getLogger(__name__)

FIELDS = ("pretrain_data", "pretrain_epochs", "pretrain_steps", "pretrain_lr", "pretrain_loss")


def pretrain(
    model: nn.Module,
    data: TensorData,
    epochs: int,
    optimizer: Callable[..., torch.optim.Optimizer],
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Train ``model`` on ``data`` (public only) for ``epochs``; one log line per epoch.

    Returns what result.json records: epochs, optimizer steps, the last epoch's mean loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params=params)
    generator = torch.Generator().manual_seed(stream_seed(seed, "pretrain"))
    start_device = next(model.parameters()).device
    model.to(device).train()
    steps, loss_mean = 0, float("nan")
    for epoch in range(epochs):
        start = time.perf_counter()
        total, correct, count = 0.0, 0, 0
        for index in torch.randperm(len(data), generator=generator).split(batch_size):
            x, y = data[index]
            x, y = x.to(device), y.to(device)
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.detach()) * len(y)
            correct += int((logits.detach().argmax(1) == y).sum())
            count += len(y)
        loss_mean = total / max(count, 1)
        log.info(
            "pretrain epoch %d/%d: loss %.4f, accuracy %.4f on %d public examples, %.1f s",
            epoch + 1,
            epochs,
            loss_mean,
            correct / max(count, 1),
            count,
            time.perf_counter() - start,
        )
    opt.zero_grad(set_to_none=True)
    model.to(start_device)
    return {"pretrain_epochs": epochs, "pretrain_steps": steps, "pretrain_loss": loss_mean}


def run_stage(
    model: nn.Module,
    datamodule,
    output_dir: Path,
    epochs: int,
    optimizer: Callable[..., torch.optim.Optimizer],
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    resuming: bool = False,
) -> dict[str, Any]:
    """The pretraining stage of a run: pretrain and save, or, when a resumed run already
    saved its pretrained weights, load them (so that masks chosen after pretraining match)."""
    path = output_dir / PRETRAINED_WEIGHTS
    if resuming and path.is_file():
        from safetensors import safe_open
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path, device="cpu"))
        with safe_open(path, framework="pt") as f:
            saved = f.metadata() or {}
        log.info("pretrain: resumed run, pretrained weights read from %s", path)
        fields = {k: saved.get(k) for k in FIELDS}
        for key in ("pretrain_epochs", "pretrain_steps"):
            fields[key] = int(fields[key]) if fields[key] is not None else None
        for key in ("pretrain_lr", "pretrain_loss"):
            fields[key] = float(fields[key]) if fields[key] is not None else None
        return {**fields, "pretrained_weights": str(path)}
    datamodule.setup("fit")
    fields = {
        "pretrain_data": datamodule.public_description,
        **pretrain(model, datamodule.public, epochs, optimizer, batch_size, seed, device),
        "pretrain_lr": lr,
    }
    save_weights(model, path, fields)
    return {**fields, "pretrained_weights": str(path)}
