"""The clipping benchmark: one JSON line per mode, a CSV in the run dir, ratios to non-private."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from dpexp.bench import FIELDS, bench_autocast, bench_device, benchmark, markdown_table, peak_mb
from dpexp.errors import ConfigError
from dpexp.train import CONFIG_DIR

TINY_BENCH = [
    "model=cnn_tanh",
    "dataset=synthetic",
    "dataset.image_shape=[1,16,16]",
    "dataset.batch_size=8",
    "bench.warmup=1",
    "bench.repeats=1",
    "bench.modes=[bk,mixed_ghost,opacus_ghost]",
]


def test_bench_config_composes_train_groups():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="bench", overrides=["model=timm", "+model.patch_size=4"])
    assert cfg.model.name == "timm" and cfg.model.patch_size == 4
    assert cfg.dataset.name == "mnist" and cfg.bench.repeats > 0


def test_peak_memory_counts_what_is_live_at_once():
    def step():
        a = torch.zeros(1024, 1024)  # 4 MiB
        b = torch.zeros(2048, 1024)  # 8 MiB, 12 live
        del a
        c = torch.zeros(1024, 1024)  # 12 live again
        del b, c

    assert peak_mb(step) == 12.0


def test_bench_cli_prints_one_json_line_per_mode_and_writes_csv(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dpexp.bench", *TINY_BENCH, f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, check=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [r["clipping"] for r in rows] == ["non_private", "bk", "mixed_ghost", "opacus_ghost"]
    assert all(list(r) == FIELDS for r in rows)
    base = rows[0]
    assert base["time_ratio"] == 1.0 and base["mem_ratio"] == 1.0 and base["peak_mem_mb"] > 0
    for r in rows[1:]:
        assert abs(r["time_ratio"] - r["step_ms"] / base["step_ms"]) <= 0.01 * r["time_ratio"]
        assert r["batch_size"] == 8 and r["model"] == "cnn_tanh"
    with (tmp_path / "bench.csv").open() as f:
        saved = list(csv.DictReader(f))
    assert [r["clipping"] for r in saved] == [r["clipping"] for r in rows]
    table = markdown_table(saved)
    assert table.count("\n") == len(rows) + 1 and "| cnn_tanh | bk | 8 |" in table


def bench_cfg(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="bench", overrides=[*TINY_BENCH, *overrides])


def test_bf16_autocast_runs_every_step_and_keeps_gradients_in_float32():
    """Under autocast the engines sum in bfloat16; the step casts the sums back before the
    noise, so the noise is drawn at the parameters' precision and the update is float32."""
    rows = benchmark(bench_cfg("bench.autocast=bf16", "bench.modes=[bk,per_sample]"))
    assert [r["clipping"] for r in rows] == ["non_private", "bk", "per_sample"]
    assert {(r["device"], r["precision"]) for r in rows} == {("cpu", "bf16")}
    assert all(r["step_ms"] > 0 and r["peak_mem_mb"] > 0 for r in rows)


def test_bench_device_and_autocast_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"^bench\.device='tpu' is invalid: cpu"):
        bench_device(bench_cfg("bench.device=tpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"no CUDA device here"):
            bench_device(bench_cfg("bench.device=cuda"))
    with pytest.raises(ConfigError, match=r"^bench\.autocast='fp16' is invalid: null .* or bf16$"):
        bench_autocast(bench_cfg("bench.autocast=fp16"))


def test_table_names_device_and_precision_and_reads_old_csvs():
    row = {"model": "resnet_gn", "clipping": "bk", "batch_size": 256, "step_ms": 2.0}
    row |= {"time_ratio": 1.5, "peak_mem_mb": 3.0, "mem_ratio": 2.0}
    table = markdown_table(
        [row, {**row, "device": "cuda", "precision": "bf16"}, {**row, "device": "cuda"}]
    )
    assert "| resnet_gn | bk | 256 |" in table  # a CSV without the device and precision
    assert "| resnet_gn (cuda, bf16 autocast) | bk |" in table
    assert "| resnet_gn (cuda) | bk |" in table
