"""The blocked matcher against a float64 brute force: both filters, any block size, ties, odd vectors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from pipelines.matcher import ProbeSet, TopK, exact_scores, score_block, unit_rows

MODES = ["int8", "float32"]


def match(probes: np.ndarray, gallery: np.ndarray, k: int, block: int, mode: str, parts: int = 1) -> TopK:
    """Blocks of `block` rows, optionally split in `parts` workers merged at the end, as the engines do."""
    prepared = ProbeSet.build(probes, "cpu", mode)
    merged = TopK(len(probes), k)
    bounds = np.linspace(0, len(gallery), parts + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds):
        top = TopK(len(probes), k)
        for start in range(lo, hi, block):
            stop = min(hi, start + block)
            top.add(*score_block(prepared, top, gallery[start:stop], np.arange(start, stop, dtype=np.int64)))
        merged.merge(top)
    return merged


def reference(probes: np.ndarray, gallery: np.ndarray, k: int) -> list[list[tuple[float, int]]]:
    """Every pair scored by the one scoring function; the k best and every tie with the k-th."""
    unit = unit_rows(probes)
    out = []
    for q in range(len(unit)):
        scores = exact_scores(unit, gallery, np.full(len(gallery), q), np.arange(len(gallery)))
        order = sorted(range(len(gallery)), key=lambda g: (-scores[g], g))
        if len(order) > k:
            kth = scores[order[k - 1]]
            order = [g for g in order if scores[g] >= kth]
        out.append([(float(scores[g]), g) for g in order])
    return out


def kept(top: TopK, q: int) -> list[tuple[float, int]]:
    scores, rowids = top.candidates(q)
    return sorted(zip(scores.tolist(), rowids.tolist(), strict=True), key=lambda p: (-p[0], p[1]))


def unit_gaussian(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return unit_rows(x)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("block", "parts"), [(1, 1), (7, 1), (64, 3), (1000, 1), (5000, 2)])
def test_same_candidates_as_brute_force(mode: str, block: int, parts: int) -> None:
    rng = np.random.default_rng(block)
    gallery = unit_gaussian(rng, 900, 48)
    gallery[5] = gallery[17] = gallery[400]  # exact duplicates: ties at every rank for some probe
    probes = np.concatenate([unit_gaussian(rng, 20, 48), gallery[[400, 3, 899]] * 2.5])  # unnormalised probes
    top = match(probes, gallery, 6, block, mode, parts)
    expected = reference(probes, gallery, 6)
    for q in range(len(probes)):
        assert kept(top, q) == expected[q]
    assert [g for _, g in kept(top, 20)][:3] == [5, 17, 400]  # a tie broken by row here (by id in `ranked`)


@pytest.mark.parametrize("mode", MODES)
def test_scores_do_not_depend_on_blocks_or_workers(mode: str) -> None:
    rng = np.random.default_rng(3)
    gallery, probes = unit_gaussian(rng, 2000, 64), unit_gaussian(rng, 15, 64)
    runs = [match(probes, gallery, 10, block, mode, parts) for block, parts in ((2000, 1), (33, 1), (256, 4))]
    other = match(probes, gallery, 10, 128, "float32" if mode == "int8" else "int8")
    for q in range(len(probes)):
        first = kept(runs[0], q)
        assert all(kept(run, q) == first for run in runs[1:])
        assert kept(other, q) == first  # both filters give bit-identical scores: rescoring is the same


@pytest.mark.parametrize("mode", MODES)
def test_odd_vectors(mode: str) -> None:
    """Outlier components, unnormalised and zero gallery rows, a zero probe, K above the gallery size."""
    rng = np.random.default_rng(11)
    gallery = rng.standard_normal((300, 32)).astype(np.float32) * rng.uniform(0.01, 50, (300, 1)).astype(np.float32)
    gallery[7] = 0.0
    gallery[8, 3] = 1e4  # one huge component: a coarse quantisation step for its block, still exact
    probes = rng.standard_normal((6, 32)).astype(np.float32)
    probes[2] = 0.0  # every score 0: all rows tie
    for k, block in ((5, 40), (400, 64)):
        top = match(probes, gallery, k, block, mode)
        expected = reference(probes, gallery, k)
        for q in range(len(probes)):
            assert kept(top, q) == expected[q]
    assert len(kept(match(probes, gallery, 5, 40, mode), 2)) == 300


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 120),
    q=st.integers(1, 5),
    k=st.integers(1, 15),
    block=st.integers(1, 50),
    levels=st.sampled_from([2, 3, 256]),
    mode=st.sampled_from(MODES),
)
def test_property_matches_brute_force(seed: int, n: int, q: int, k: int, block: int, levels: int, mode: str) -> None:
    """Few distinct coordinate values give many exact ties; many give none."""
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-(levels // 2), levels // 2 + 1, size=(n, 8)).astype(np.float32)
    probes = rng.integers(-(levels // 2), levels // 2 + 1, size=(q, 8)).astype(np.float32)
    top = match(probes, gallery, k, block, mode, parts=2 if n > 10 else 1)
    expected = reference(probes, gallery, k)
    for row in range(q):
        assert kept(top, row) == expected[row]


@pytest.mark.parametrize("mode", MODES)
def test_differences_finer_than_the_filter(mode: str) -> None:
    """Gallery rows that differ far below the int8 step: only the bound keeps the true best in."""
    rng = np.random.default_rng(5)
    base = unit_gaussian(rng, 1, 64)[0]
    gallery = unit_gaussian(rng, 400, 64)
    gallery[100:300] = base + rng.standard_normal((200, 64)).astype(np.float32) * 1e-4
    probes = base[None, :] + rng.standard_normal((8, 64)).astype(np.float32) * 1e-3
    top = match(probes, gallery, 4, 50, mode)
    expected = reference(probes, gallery, 4)
    for q in range(len(probes)):
        assert kept(top, q) == expected[q]


@pytest.mark.parametrize("mode", MODES)
def test_worst_case_rounding_is_within_the_bound(mode: str) -> None:
    """Every int8 rounding error at its largest and against the probe: a row that looks worse than the
    running k-th by almost the whole bound is still the best one, and must be found."""
    t = np.float32(1 / 127)  # the step of block 2: its peak component is -1.0
    c = np.full(8, 10.4875, np.float32) * t  # block 1: sets the running best (k = 1)
    a = np.full(8, 10.49, np.float32) * t  # block 2: every component rounds down by 0.49 steps
    peak = np.zeros(8, np.float32)
    peak[0] = -1.0
    gallery = np.stack([c, np.zeros(8, np.float32), a, peak])
    probes = np.ones((1, 8), np.float32)
    top = match(probes, gallery, 1, 2, mode)
    assert kept(top, 0) == reference(probes, gallery, 1)[0]
    assert [row for _, row in kept(top, 0)] == [2]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (37, 300)])
def test_survivors_in_probe_then_column_order(mode: str, shape: tuple[int, int]) -> None:
    """Whatever the product's layout in memory ((B, Q) for float32), the pairs come out as a (Q, B) scan
    would give them, and the reused mask buffer never carries a hit over from an earlier block."""
    from pipelines.matcher import _survivors, filter_product

    q, b = shape
    rng = np.random.default_rng(q * 1000 + b)
    prepared = ProbeSet.build(rng.standard_normal((q, 16)).astype(np.float32), "cpu", mode)
    for _ in range(2):  # the second block reuses the first one's buffers
        gallery = unit_gaussian(rng, b, 16)
        approx, _, _ = filter_product(prepared, gallery)
        assert approx.shape == (q, b)
        cut = np.quantile(approx.numpy().astype(np.float64), 0.7, axis=1)
        qi, gi = _survivors(approx, cut, prepared)
        values = approx.numpy()
        expect_q, expect_g = np.nonzero(values >= cut.astype(values.dtype)[:, None])
        assert qi.tolist() == expect_q.tolist() and gi.tolist() == expect_g.tolist()
        assert qi.dtype == gi.dtype == np.int64
        plain = _survivors(approx, cut)  # without a ProbeSet: a fresh mask
        assert plain[0].tolist() == qi.tolist() and plain[1].tolist() == gi.tolist()
