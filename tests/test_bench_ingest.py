"""The ingest benchmark's reference figures: the stage bound and the job size that reaches the target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))

import bench_ingest as bench


def results(stage1: float, stage2: float, device: str) -> bench.Results:
    res = bench.Results(device=device)
    res.rows["prepare"] = bench.Row("stage 1", int(stage1 * 10), 10.0)
    res.rows["embed"] = bench.Row("stage 2", int(stage2 * 10), 10.0)
    return res


def test_stage_bound_on_shared_cores_is_both_stages_back_to_back() -> None:
    # 20 img/s and 30 img/s on the same cores: 1/20 + 1/30 s of work per image -> 12 img/s
    assert bench.stage_bound(results(20, 30, "cpu")) == pytest.approx(12.0)


def test_stage_bound_with_the_model_stage_on_a_gpu_is_the_slowest_stage() -> None:
    assert bench.stage_bound(results(20, 30, "cuda")) == pytest.approx(20.0)


def test_break_even_job_size_reaches_the_target_rate() -> None:
    startup, steady, target = 30.0, 10.0, 7.0
    images = float(bench.break_even(target, startup, steady).replace(",", ""))
    assert images / (startup + images / steady) == pytest.approx(target, rel=1e-3)
    smaller = images * 0.9
    assert smaller / (startup + smaller / steady) < target
    assert bench.break_even(10.0, startup, steady) == "never"


def test_ratio_table_flags_the_target_per_engine() -> None:
    res = results(20, 30, "cpu")
    res.rows["e2e_local"] = bench.Row("local", 100, 10.0)  # 10 img/s against a bound of 12: 0.83
    res.rows["e2e_ray"] = bench.Row("ray", 60, 10.0)  # 6 img/s: 0.50
    (local, ray) = bench.ratios(res)
    assert local[0] == "local" and local[6] == "0.83 (met)"
    assert ray[0] == "ray" and ray[6] == "0.50 (NO)"
