"""The filter kernel's choice, from faked CPU facts and timings; and that the kernel never changes a result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipelines.match_unit import (
    INT8_GAIN,
    FilterTiming,
    MatchUnit,
    choose_filter_kernel,
    cpu_kernel_report,
    decide_filter_kernel,
    kernel_report,
    parse_cpuinfo,
    run_unit,
    time_filters,
)
from pipelines.matcher import INT8_MIN_PROBES, ProbeSet, TopK

EPYC = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx f16c avx2 fma\n"
XEON = "model name\t: Intel(R) Xeon(R) Processor @ 2.50GHz\nflags\t\t: avx2 fma avx512f avx512bw avx512_vnni\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp i8mm sve\nCPU part\t: 0xd40\n"
GUIDE_EPYC = FilterTiming(int8_ms=17_300.0, float32_ms=220.0)  # (1024, 512) x (512, 16384), docs/guide
XEON_PROBE = FilterTiming(int8_ms=0.20, float32_ms=0.45)


def test_parse_cpuinfo_x86_and_arm() -> None:
    assert parse_cpuinfo(EPYC) == ("AMD EPYC", frozenset({"fpu", "sse4_2", "avx", "f16c", "avx2", "fma"}))
    model, flags = parse_cpuinfo(XEON)
    assert model.startswith("Intel(R) Xeon(R)") and "avx512_vnni" in flags
    assert parse_cpuinfo(ARM) == ("", frozenset({"fp", "asimd", "asimddp", "i8mm", "sve"}))
    assert parse_cpuinfo("") == ("", frozenset())


def test_avx2_only_never_int8_whatever_the_timing() -> None:
    """Without an int8 dot-product instruction the probe is not even consulted."""
    _, flags = parse_cpuinfo(EPYC)
    for timing in (None, GUIDE_EPYC, XEON_PROBE):
        assert decide_filter_kernel("x86_64", flags, timing).kernel == "float32"


def test_vnni_int8_only_when_measurably_faster() -> None:
    _, flags = parse_cpuinfo(XEON)
    assert decide_filter_kernel("x86_64", flags, XEON_PROBE).kernel == "int8"
    assert decide_filter_kernel("AMD64", flags, XEON_PROBE).kernel == "int8"
    assert decide_filter_kernel("x86_64", flags, GUIDE_EPYC).kernel == "float32"
    assert decide_filter_kernel("x86_64", flags, None).kernel == "float32"  # untimed: the safe one
    marginal = FilterTiming(int8_ms=1.0, float32_ms=INT8_GAIN * 0.99)  # faster, but within noise
    assert decide_filter_kernel("x86_64", flags, marginal).kernel == "float32"
    enough = FilterTiming(int8_ms=1.0, float32_ms=INT8_GAIN)
    assert decide_filter_kernel("x86_64", flags, enough).kernel == "int8"


@pytest.mark.parametrize("arch", ["aarch64", "arm64", "riscv64", ""])
def test_arm_and_unknown_cpus_fall_back_to_float32(arch: str) -> None:
    _, flags = parse_cpuinfo(ARM)
    fake = flags | {"avx512_vnni", "amx_int8"}  # even with x86 flag names: the architecture decides first
    choice = decide_filter_kernel(arch, fake, XEON_PROBE)
    assert choice.kernel == "float32" and "only tried on x86-64" in choice.reason


def test_choice_reports_its_reason_with_the_timings() -> None:
    _, flags = parse_cpuinfo(XEON)
    assert "0.200 ms" in decide_filter_kernel("x86_64", flags, XEON_PROBE).reason
    assert "avx512_vnni" in decide_filter_kernel("x86_64", frozenset(), None).reason


def test_small_batches_and_gpus_use_float32() -> None:
    assert choose_filter_kernel(INT8_MIN_PROBES - 1, "cpu") == "float32"
    assert choose_filter_kernel(10_000, "cuda") == "float32"
    assert choose_filter_kernel(10_000, "cpu") == kernel_report().kernel  # this CPU's own choice, cached


def test_this_cpu_report_is_json_and_consistent() -> None:
    report = json.loads(json.dumps(cpu_kernel_report()))
    assert set(report) == {"cpu_model", "arch", "torch_capability", "vector_flags", "timing", "kernel", "reason"}
    assert report["kernel"] in ("int8", "float32") and report["cpu_model"]
    if not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(report["vector_flags"]):
        assert report["kernel"] == "float32" and report["timing"] is None  # no probe where it cannot matter


def test_time_filters_measures_both() -> None:
    timing = time_filters(repeats=1)
    assert timing.int8_ms > 0 and timing.float32_ms > 0


def test_probe_set_auto_follows_the_choice() -> None:
    for n in (3, INT8_MIN_PROBES):
        probes = np.ones((n, 8), np.float32)
        assert ProbeSet.build(probes).mode == choose_filter_kernel(n, "cpu")
        assert ProbeSet.build(probes, "cpu", "int8").mode == "int8"  # an explicit kernel is kept


def test_probe_set_refuses_unknown_kernels() -> None:
    probes = np.ones((2, 8), np.float32)
    with pytest.raises(ValueError, match="filter kernel"):
        ProbeSet.build(probes, "cpu", "int4")
    with pytest.raises(ValueError, match="filter kernel"):
        ProbeSet.build(probes, "cuda", "int8")


def test_run_unit_gives_the_same_top_k_with_every_kernel(tmp_path: Path) -> None:
    """`run_unit` over a small Lance table: forced int8, forced float32 and the automatic choice agree bit for
    bit (INT8_MIN_PROBES probes and more, so `auto` is the CPU's own choice, whatever this machine is)."""
    import lance

    rng = np.random.default_rng(7)
    gallery = rng.standard_normal((1500, 32)).astype(np.float32)
    gallery[10] = gallery[20]  # a tie
    flat = pa.FixedSizeListArray.from_arrays(pa.array(gallery.reshape(-1)), 32)
    uri = str(tmp_path / "faces.lance")
    dataset = lance.write_dataset(pa.table({"vector": flat, "model_id": ["m"] * len(gallery)}), uri)
    fragments = tuple(f.fragment_id for f in dataset.get_fragments())
    probes = rng.standard_normal((INT8_MIN_PROBES + 4, 32)).astype(np.float32)
    tops = {
        kernel: run_unit(MatchUnit(uri, dataset.version, fragments, "model_id = 'm'", 5, 400, "cpu", kernel), probes)
        for kernel in ("int8", "float32", "auto")
    }
    first = kept(tops["float32"])
    assert len(first) >= 5 * len(probes)
    for top in tops.values():
        assert kept(top) == first


def kept(top: TopK) -> list[tuple[int, float, int]]:
    """Every kept candidate as (probe, score, row id), in one canonical order."""
    rows = zip(top.probe.tolist(), top.score.tolist(), top.rowid.tolist(), strict=True)
    return sorted(rows, key=lambda r: (r[0], -r[1], r[2]))


@pytest.mark.parametrize(("block_rows", "prefetch"), [(7, 2), (333, 2), (5000, 2), (333, 0), (333, 1)])
def test_run_unit_reads_ahead_without_changing_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_rows: int, prefetch: int
) -> None:
    """Several fragments, scan batches smaller and larger than a block (blocks copied into the read-ahead's
    reused buffers, or sliced from a batch), read ahead or not: the same top-k as one brute-force pass."""
    import lance

    from pipelines import match_unit
    from pipelines.matcher import exact_scores, unit_rows

    monkeypatch.setattr(match_unit, "SCAN_BATCH", 100)
    monkeypatch.setattr(match_unit, "PREFETCH", prefetch)
    rng = np.random.default_rng(block_rows)
    gallery = rng.standard_normal((1200, 16)).astype(np.float32)
    uri = str(tmp_path / "faces.lance")
    for start in range(0, len(gallery), 500):  # fragments of 500, 500 and 200 rows
        part = gallery[start : start + 500]
        table = pa.table({"vector": pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), 16)})
        dataset = lance.write_dataset(table, uri, mode="append" if start else "create")
    fragments = tuple(f.fragment_id for f in dataset.get_fragments())
    probes = rng.standard_normal((6, 16)).astype(np.float32)
    unit = MatchUnit(uri, dataset.version, fragments, "true", 4, block_rows, "cpu", "float32")
    top = run_unit(unit, probes)
    unit_probes = unit_rows(probes)
    for q in range(len(probes)):
        scores = exact_scores(unit_probes, gallery, np.full(len(gallery), q), np.arange(len(gallery)))
        best = np.sort(scores)[::-1][3]
        got, rowids = top.candidates(q)
        rows = (rowids >> 32) * 500 + (rowids & 0xFFFFFFFF)  # Lance row ids: fragment << 32 | offset
        assert sorted(rows.tolist()) == sorted(np.flatnonzero(scores >= best).tolist())
        assert got.tolist() == sorted(scores[scores >= best].tolist(), reverse=True)


def test_read_ahead_raises_the_readers_error_and_stops_when_left() -> None:
    from pipelines.match_unit import _read_ahead

    def failing():  # type: ignore[no-untyped-def]
        yield 1
        raise OSError("storage went away")

    reader = _read_ahead(failing(), 2)
    assert next(reader) == 1
    with pytest.raises(OSError, match="storage went away"):
        next(reader)

    produced: list[int] = []

    def endless():  # type: ignore[no-untyped-def]
        for i in range(10**9):
            produced.append(i)
            yield i

    reader = _read_ahead(endless(), 2)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # the consumer stops early: the thread ends instead of reading on
    count = len(produced)
    assert count <= 3 + 2 + 2
    import time

    time.sleep(0.3)
    assert len(produced) == count
