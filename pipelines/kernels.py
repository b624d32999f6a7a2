"""The filter kernel a match worker runs, by what its CPU has and does: engine-free, storage-free compute.

`choose_filter_kernel` picks int8 only where this process's CPU has an int8 dot-product instruction and a
short timed probe finds int8 clearly faster than float32; the choice is made once per process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.matcher import FILTER_KERNELS, INT8_MIN_PROBES, ProbeSet, filter_product, unit_rows

X86 = ("x86_64", "amd64")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot-product instructions (/proc/cpuinfo names)
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", *INT8_FLAGS, "asimd", "asimddp", "i8mm", "sve")  # reported
PROBE_ROWS, PROBE_DIM = 256, 512  # the timed probe: INT8_MIN_PROBES probes by 256 gallery rows, 512-d
PROBE_REPEATS = 3  # timed rounds after one warm-up round; best of them
INT8_GAIN = 1.25  # int8 is chosen only when the probe times it at least this much faster than float32
CLEARLY_SLOWER = 4.0  # the probe stops early once int8 is this much slower than float32


@dataclass(frozen=True)
class FilterTiming:
    """Best-of-rounds milliseconds of each filter product (`matcher.filter_product`) on the probe block."""

    int8_ms: float
    float32_ms: float


@dataclass(frozen=True)
class KernelChoice:
    """The filter kernel for batches of INT8_MIN_PROBES probes or more on this CPU, and why."""

    kernel: str
    reason: str


@dataclass(frozen=True)
class KernelReport:
    """What this process's CPU offers the filter, what the probe measured (None: not needed), and the choice."""

    cpu_model: str
    arch: str
    torch_capability: str
    vector_flags: tuple[str, ...]
    timing: FilterTiming | None
    kernel: str
    reason: str


def worker_device(setting: str) -> str:
    """The device a unit runs on ("auto" resolved in this process)."""
    from pipelines.models import resolve_device

    return resolve_device(setting)


def unit_kernel(setting: str, n_probes: int, device: str) -> str:
    """The kernel a unit runs: its forced one, or the one chosen for this worker ("auto")."""
    return choose_filter_kernel(n_probes, device) if setting == "auto" else setting


def choose_filter_kernel(n_probes: int, device: str = "cpu") -> str:
    """The filter kernel, "int8" or "float32", for `n_probes` probes on `device` ("auto" resolved) in this process."""
    if worker_device(device) != "cpu" or n_probes < INT8_MIN_PROBES:
        return "float32"
    return kernel_report().kernel


def cpu_kernel_report() -> dict[str, Any]:
    """`kernel_report()` as plain JSON-ready values, for run manifests and benchmark tables."""
    return dataclasses.asdict(kernel_report())


@functools.cache
def kernel_report() -> KernelReport:
    """This CPU's facts, the probe's timings where they can matter, and the choice: measured once per process."""
    model, flags = parse_cpuinfo(_read_cpuinfo())
    arch = platform.machine().lower()
    timing = time_filters() if int8_capable(arch, flags) else None
    choice = decide_filter_kernel(arch, flags, timing)
    found = tuple(f for f in VECTOR_FLAGS if f in flags)
    name = model or platform.processor() or "unknown CPU"
    return KernelReport(name, arch, _torch_capability(), found, timing, choice.kernel, choice.reason)


def decide_filter_kernel(arch: str, flags: frozenset[str], timing: FilterTiming | None) -> KernelChoice:
    """Pure: int8 only on x86-64 with an int8 dot-product instruction where the probe timed int8 INT8_GAIN
    times faster than float32; float32 everywhere else (Arm, unknown CPUs, untimed)."""
    if arch.lower() not in X86:
        return KernelChoice("float32", f"{arch or 'unknown architecture'}: int8 is only tried on x86-64")
    if not int8_capable(arch, flags):
        return KernelChoice("float32", f"no {'/'.join(INT8_FLAGS)}: no fast int8 product on this x86-64 CPU")
    if timing is None:
        return KernelChoice("float32", "int8 product not timed")
    measured = f"probe int8 {timing.int8_ms:.3f} ms vs float32 {timing.float32_ms:.3f} ms"
    if timing.int8_ms * INT8_GAIN <= timing.float32_ms:
        return KernelChoice("int8", f"{measured}: int8 at least {INT8_GAIN}x faster")
    return KernelChoice("float32", f"{measured}: int8 not {INT8_GAIN}x faster")


def int8_capable(arch: str, flags: frozenset[str]) -> bool:
    """x86-64 with at least one int8 dot-product instruction: the only CPUs where int8 is worth timing."""
    return arch.lower() in X86 and any(flag in flags for flag in INT8_FLAGS)


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo text (x86 `flags`, Arm `Features`); what is missing is empty."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    model = fields.get("model name") or fields.get("Model") or ""
    return model, frozenset((fields.get("flags") or fields.get("Features") or "").split())


def time_filters(repeats: int = PROBE_REPEATS) -> FilterTiming:
    """Both filter products of INT8_MIN_PROBES seeded probes by one PROBE_ROWS block, interleaved, best of
    `repeats` rounds after a warm-up (~1 ms a round where int8 is fast); stops once int8 is clearly slower."""
    rng = np.random.default_rng(0)
    probes = rng.standard_normal((INT8_MIN_PROBES, PROBE_DIM), dtype=np.float32)
    block = unit_rows(rng.standard_normal((PROBE_ROWS, PROBE_DIM), dtype=np.float32))
    prepared = {mode: ProbeSet.build(probes, "cpu", mode) for mode in FILTER_KERNELS}
    best = dict.fromkeys(FILTER_KERNELS, math.inf)
    for round_ in range(repeats + 1):
        seconds = {mode: _seconds(queries, block) for mode, queries in prepared.items()}
        if round_:  # round 0 warms up (kernel set-up, buffers)
            best = {mode: min(best[mode], seconds[mode]) for mode in best}
            if best["int8"] > CLEARLY_SLOWER * best["float32"]:
                break
    return FilterTiming(best["int8"] * 1e3, best["float32"] * 1e3)


def _seconds(queries: ProbeSet, block: np.ndarray) -> float:
    start = time.perf_counter()
    filter_product(queries, block)
    return time.perf_counter() - start


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _torch_capability() -> str:
    import torch

    return str(torch.backends.cpu.get_cpu_capability())
