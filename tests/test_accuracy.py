"""NIST-style accuracy figures (`pipelines.accuracy`) against hand-computed values on tiny inputs."""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines import accuracy
from pipelines.accuracy import (
    IdentificationResult,
    clopper_pearson,
    evaluate_identification,
    evaluate_verification,
    fmr_for_fpir,
    fpir_from_fmr,
    fpir_key,
    identification_from_scores,
    threshold_for_fmr,
    verification_from_scores,
    write_det_plot,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def at(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at the given angles: the score of two is the cosine of their angle."""
    r = np.radians(np.asarray(degrees, np.float64))
    return np.stack([np.cos(r), np.sin(r)], axis=1)


def cos(deg: float) -> float:
    return math.cos(math.radians(deg))


# Gallery: A and B share one vector (an exact tie), then C..G.
GALLERY = at(0, 0, 90, 125, 180, 200, 250)
GALLERY_IDS = ["A", "B", "C", "E", "D", "F", "G"]
# Mated probes: A at 12 deg (tied with B: pessimistic rank 2), C at 90 deg (rank 1), D at 150 deg (E at 125 is
# closer: rank 2), G at 40 deg (A, B, C, E, D all score higher: rank 6).
MATED = at(12, 90, 150, 40)
MATED_IDS = ["A", "C", "D", "G"]
MATE_SCORES = [cos(12), 1.0, cos(30), cos(210)]
# Non-mated probes whose nearest gallery entry is 5, 10, 15, 20, 25, 28, 35, 40, 45, 50 degrees away.
NON_MATED = at(5, 80, 15, 20, 25, 28, 55, 50, 45, 300)
NON_MATED_TOP = sorted(cos(d) for d in (5, 10, 15, 20, 25, 28, 35, 40, 45, 50))


def hand_result(**kwargs: object) -> IdentificationResult:
    args: dict[str, object] = {"mated_failed": 1, "fpir_targets": (0.1, 0.3, 0.01, 0.25), "ranks": (1, 5)}
    args.update(kwargs)
    return evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, NON_MATED, **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# 1:N


def test_scores_and_pessimistic_ranks() -> None:
    r = hand_result()
    assert r.mated_scores == pytest.approx(sorted(MATE_SCORES), abs=1e-12)
    assert list(r.mated_ranks) == [1, 2, 2, 6]
    assert r.non_mated_scores == pytest.approx(NON_MATED_TOP, abs=1e-12)
    assert r.gallery_size == 7
    assert r.mated_searches == 5  # 4 with a face + 1 failed
    assert r.non_mated_searches == 10


def test_rank_hit_rates_count_ties_and_failures_as_misses() -> None:
    r = hand_result()
    # Rank 1: only C (A is tied with B, so its pessimistic rank is 2); the failed search is a miss.
    assert r.rank_hit_rate[1] == pytest.approx(1 / 5)
    # Rank 5: A, C, D; G is 6th.
    assert r.rank_hit_rate[5] == pytest.approx(3 / 5)
    assert r.hit_rate(2) == pytest.approx(3 / 5)
    assert r.hit_rate(6) == pytest.approx(4 / 5)
    assert r.hit_rate(100) == pytest.approx(4 / 5)  # never 1: the failed search misses at every rank
    no_failures = hand_result(mated_failed=0)
    assert no_failures.rank_hit_rate[1] == pytest.approx(1 / 4)
    assert no_failures.hit_rate(6) == 1.0


def test_tie_at_the_rank_boundary_counts_pessimistically() -> None:
    # The mate and two other entries share one vector: pessimistic rank 3, whatever the order of the gallery.
    gallery = at(0, 0, 0, 90)
    for ids in (["m", "x", "y", "z"], ["x", "y", "m", "z"]):
        r = evaluate_identification(gallery, ids, at(0), ["m"], at(45), ranks=(1, 2, 3))
        assert list(r.mated_ranks) == [3]
        assert r.rank_hit_rate == {1: 0.0, 2: 0.0, 3: 1.0}


def test_mate_with_several_entries_uses_its_best() -> None:
    gallery = at(0, 30, 20)
    r = evaluate_identification(gallery, ["m", "m", "x"], at(28), ["m"], at(90), ranks=(1,))
    assert r.mated_scores[0] == pytest.approx(cos(2))
    assert list(r.mated_ranks) == [1]  # its own other entry is not counted against it


def test_thresholds_fpir_and_fnir_at_targets() -> None:
    r = hand_result()
    top = sorted(NON_MATED_TOP, reverse=True)  # cos 5, cos 10, cos 15, ...
    # f = 0.1 with U = 10: one non-mated search may be accepted; the threshold sits just above the 2nd highest.
    assert r.threshold_at_fpir[0.1] == pytest.approx(top[1], abs=1e-12)
    assert r.threshold_at_fpir[0.1] == float(np.nextafter(r.non_mated_scores[-2], np.inf))  # as computed
    assert r.fpir_at_threshold[0.1] == pytest.approx(0.1)
    # Mate scores cos 12, 1, cos 30, cos 210 (+ 1 failed): only the 1.0 reaches cos 10.
    assert r.fnir_at_fpir[0.1] == pytest.approx(4 / 5)
    assert r.resolvable[0.1] is True
    # f = 0.3: three accepted, the threshold just above cos 20; cos 12 and 1.0 reach it.
    assert r.threshold_at_fpir[0.3] == pytest.approx(top[3], abs=1e-12)
    assert r.fpir_at_threshold[0.3] == pytest.approx(0.3)
    assert r.fnir_at_fpir[0.3] == pytest.approx(3 / 5)
    # f = 0.25: k = 2 (2/10 <= 0.25 < 3/10), threshold just above cos 15, achieved FPIR 0.2 <= 0.25.
    assert r.threshold_at_fpir[0.25] == pytest.approx(top[2], abs=1e-12)
    assert r.fpir_at_threshold[0.25] == pytest.approx(0.2)
    assert r.fnir_at_fpir[0.25] == pytest.approx(3 / 5)
    # f = 0.01 with U = 10: unresolvable; nothing may be accepted: just above the highest, FPIR 0.
    assert r.threshold_at_fpir[0.01] == pytest.approx(top[0], abs=1e-12)
    assert r.fpir_at_threshold[0.01] == 0.0
    assert r.fnir_at_fpir[0.01] == pytest.approx(4 / 5)
    assert r.resolvable[0.01] is False
    # The functions agree with the reported figures, and the threshold is the smallest that meets the target.
    for f in r.fpir_targets:
        t = r.threshold_at_fpir[f]
        assert t is not None
        assert r.fpir(t) == r.fpir_at_threshold[f]
        assert r.fnir(t) == r.fnir_at_fpir[f]
        below = r.fpir(float(np.nextafter(t, -np.inf)))
        assert below is not None
        assert below > f


def test_threshold_with_tied_non_mated_scores() -> None:
    non_mated = [0.9, 0.8, 0.8, 0.8, 0.1, 0.2, 0.3, 0.0, -0.1, -0.2]
    r = identification_from_scores([0.85, 0.5], [1, 1], non_mated, gallery_size=3, fpir_targets=(0.2,))
    # k = 2, but the 2nd..4th highest tie at 0.8: the smallest threshold with FPIR <= 0.2 is just above 0.8.
    assert r.threshold_at_fpir[0.2] == float(np.nextafter(0.8, np.inf))
    assert r.fpir_at_threshold[0.2] == pytest.approx(0.1)
    assert r.fnir_at_fpir[0.2] == pytest.approx(1 / 2)


def test_target_just_at_a_multiple_of_one_over_u() -> None:
    # 0.29 * 100 = 28.999999999999996 in floating point: 29 accepted searches must still be allowed.
    non_mated = np.linspace(0.0, 0.99, 100)
    r = identification_from_scores([], [], non_mated, gallery_size=1, fpir_targets=(0.29,))
    assert r.fpir_at_threshold[0.29] == 0.29
    assert r.fnir_at_fpir[0.29] is None  # no mated searches
    assert r.rank_hit_rate == {1: None, 5: None}


def test_resolvable_flag() -> None:
    for u, f, expected in ((99, 0.01, False), (100, 0.01, True), (999, 0.001, False), (1000, 0.001, True)):
        r = identification_from_scores([0.5], [1], np.linspace(-1, 1, u), gallery_size=1, fpir_targets=(f,))
        assert r.resolvable[f] is expected, (u, f)


def test_empty_non_mated_set() -> None:
    r = evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, np.zeros((0, 512), np.float32))
    assert r.non_mated_searches == 0
    for f in (0.01, 0.001):
        assert r.threshold_at_fpir[f] is None
        assert r.fnir_at_fpir[f] is None
        assert r.fpir_at_threshold[f] is None
        assert r.resolvable[f] is False
    assert r.rank_hit_rate[1] == pytest.approx(1 / 4)
    assert r.impostor.count == 0
    assert r.impostor.mean is None
    assert r.fpir(0.5) is None
    # No mated probe with a face either (an empty stack of any width), only failed ones.
    failed_only = evaluate_identification(GALLERY, GALLERY_IDS, np.zeros((0, 512)), [], NON_MATED, mated_failed=2)
    assert failed_only.mated_searches == 2
    assert failed_only.rank_hit_rate == {1: 0.0, 5: 0.0}
    assert failed_only.fnir_at_fpir == {0.01: 1.0, 0.001: 1.0}
    assert failed_only.genuine.count == 0
    js = r.to_json()
    assert js["threshold_at_fpir"] == {"0.01": None, "0.001": None}
    assert js["impostor"]["quantiles"] == {"0.01": None, "0.5": None, "0.99": None}


def test_failed_mated_searches_miss_at_every_threshold() -> None:
    r = identification_from_scores([0.9], [1], [0.1, 0.2], gallery_size=2, mated_failed=3, fpir_targets=(0.5,))
    assert r.mated_searches == 4
    assert r.fnir(-1.0) == pytest.approx(3 / 4)
    assert r.fnir(0.95) == 1.0
    assert r.rank_hit_rate[1] == pytest.approx(1 / 4)
    only_failed = identification_from_scores([], [], [0.1], gallery_size=1, mated_failed=2)
    assert only_failed.fnir_at_fpir[0.01] == 1.0
    assert only_failed.rank_hit_rate[5] == 0.0


def test_float32_inputs_and_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(60, 8))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    gallery, mated, non_mated = vectors[:20], vectors[:20] + 0.3 * rng.normal(size=(20, 8)), vectors[20:]
    mated /= np.linalg.norm(mated, axis=1, keepdims=True)
    gallery32, mated32, non_mated32 = (a.astype(np.float32) for a in (gallery, mated, non_mated))
    ids = [f"id{i % 15}" for i in range(20)]  # some identities have two entries
    whole = evaluate_identification(gallery32, ids, mated32, ids, non_mated32)
    monkeypatch.setattr(accuracy, "BLOCK_ELEMENTS", 7)  # one probe per block
    blocked = evaluate_identification(gallery32, ids, mated32, ids, non_mated32)
    assert blocked.to_json() == whole.to_json()
    # Brute force, per probe, in float64 of the float32 values.
    g64 = gallery32.astype(np.float64)
    mate, rank = [], []
    for p, pid in zip(mated32.astype(np.float64), ids, strict=True):
        s = g64 @ p
        mine = np.array([i == pid for i in ids])
        best = s[mine].max()
        mate.append(best)
        rank.append(1 + int(((s >= best) & ~mine).sum()))
    top = (non_mated32.astype(np.float64) @ g64.T).max(axis=1)
    np.testing.assert_allclose(whole.mated_scores, np.sort(mate), rtol=0, atol=1e-12)
    assert list(whole.mated_ranks) == sorted(rank)
    np.testing.assert_allclose(whole.non_mated_scores, np.sort(top), rtol=0, atol=1e-12)


def test_to_json_is_plain() -> None:
    js = hand_result(fpir_targets=(0.01, 0.001)).to_json()
    assert json.loads(json.dumps(js)) == js
    for key in ("mated_searches", "non_mated_searches", "rank1", "rank5", "genuine", "impostor"):
        assert key in js
    for key in ("fnir_at_fpir", "threshold_at_fpir", "fpir_at_threshold", "resolvable"):
        assert list(js[key]) == ["0.01", "0.001"]
    assert js["mated_searches"] == 5
    assert js["rank1"] == pytest.approx(0.2)
    assert js["resolvable"] == {"0.01": False, "0.001": False}
    genuine = js["genuine"]
    assert genuine["count"] == 4
    assert genuine["max"] == pytest.approx(1.0)
    assert genuine["min"] == pytest.approx(cos(210))
    assert genuine["mean"] == pytest.approx(np.mean(MATE_SCORES))
    assert genuine["std"] == pytest.approx(np.std(MATE_SCORES))
    assert genuine["quantiles"]["0.5"] == pytest.approx(np.median(MATE_SCORES))
    assert all(type(v) in (int, float) for v in (genuine["count"], genuine["mean"], genuine["std"]))


def test_fpir_key() -> None:
    assert fpir_key(0.01) == "0.01"
    assert fpir_key(0.001) == "0.001"
    assert fpir_key(0.0001) == "0.0001"
    assert fpir_key(1e-5) == "1e-05"
    assert fpir_key(np.float64(0.01)) == "0.01"


# ---------------------------------------------------------------------------------------------------------
# 1:1


def test_verification_hand_example() -> None:
    # a: 0 and 30 deg; b: 90 and 170 deg. Genuine: cos 30, cos 80. Impostor: cos 90, cos 170, cos 60, cos 140.
    v = evaluate_verification(at(0, 30, 90, 170), ["a", "a", "b", "b"])
    assert v.genuine_pairs == 2
    assert v.impostor_pairs == 4
    np.testing.assert_allclose(v.genuine_scores, sorted([cos(30), cos(80)]), atol=1e-12)
    np.testing.assert_allclose(v.impostor_scores, sorted([cos(90), cos(170), cos(60), cos(140)]), atol=1e-12)
    # cos 30 beats all 4 impostors, cos 80 beats 3 (not cos 60).
    assert v.auc == pytest.approx(7 / 8)
    # Sweep: at t = cos 80, FMR 1/4 and FNMR 0; at t = cos 60, FMR 1/4 and FNMR 1/2: crossing halfway.
    assert v.eer == pytest.approx(0.25)
    assert v.eer_threshold == pytest.approx((cos(80) + cos(60)) / 2)
    cos60 = v.impostor_scores[3]  # the highest impostor score, as computed
    assert cos60 == pytest.approx(cos(60), abs=1e-12)
    assert v.fmr_at(cos60) == pytest.approx(0.25)
    assert v.fnmr_at(cos60) == pytest.approx(0.5)
    assert v.fmr_at(float(np.nextafter(cos60, np.inf))) == 0.0
    js = v.to_json()
    assert json.loads(json.dumps(js)) == js
    assert (js["eer"], js["auc"], js["genuine_pairs"], js["impostor_pairs"]) == (v.eer, v.auc, 2, 4)


def test_verification_exact_crossing_and_ties() -> None:
    v = verification_from_scores([0.9, 0.5], [0.6, 0.1])
    assert v.auc == pytest.approx(3 / 4)
    assert v.eer == pytest.approx(0.5)  # FMR = FNMR = 1/2 at t = 0.6 exactly
    assert v.eer_threshold == pytest.approx(0.6)
    # A tie counts 1/2.
    assert verification_from_scores([0.5], [0.5]).auc == 0.5
    assert verification_from_scores([0.5, 0.5], [0.5]).auc == 0.5
    assert verification_from_scores([1.0, 0.5], [0.5, 0.0]).auc == pytest.approx(3.5 / 4)
    tied = verification_from_scores([0.5], [0.5])
    assert tied.eer == pytest.approx(0.5)  # FMR 1, FNMR 0 at 0.5; FMR 0, FNMR 1 just above
    separated = verification_from_scores([0.8, 0.9], [0.1, 0.2])
    assert (separated.auc, separated.eer) == (1.0, 0.0)
    inverted = verification_from_scores([0.1, 0.2], [0.8, 0.9])
    assert (inverted.auc, inverted.eer) == (0.0, 1.0)


def test_one_photo_per_class_and_single_identity() -> None:
    singletons = evaluate_verification(at(0, 40, 90), ["a", "b", "c"])
    assert singletons.genuine_pairs == 0
    assert singletons.impostor_pairs == 3
    assert singletons.auc is None
    assert singletons.eer is None
    assert singletons.eer_threshold is None
    assert singletons.fnmr_at(0.0) is None
    one_identity = evaluate_verification(at(0, 40, 90), ["a", "a", "a"])
    assert (one_identity.genuine_pairs, one_identity.impostor_pairs) == (3, 0)
    assert one_identity.auc is None
    assert one_identity.eer is None
    assert one_identity.threshold_for_fmr(0.01) == (None, None, False)
    # A class with one photo among others: it only contributes impostor pairs.
    mixed = evaluate_verification(at(0, 10, 90, 200), ["a", "a", "b", "c"])
    assert (mixed.genuine_pairs, mixed.impostor_pairs) == (1, 5)
    assert mixed.auc == 1.0
    assert evaluate_verification(np.zeros((0, 4)), []).auc is None


def test_threshold_for_fmr() -> None:
    impostor = np.sort(np.linspace(-0.5, 0.5, 1000))
    t, achieved, ok = threshold_for_fmr(impostor, 0.01)
    assert t == float(np.nextafter(impostor[-11], np.inf))
    assert achieved == pytest.approx(0.01)
    assert ok is True
    t, achieved, ok = threshold_for_fmr(impostor, 1e-4)
    assert t == float(np.nextafter(impostor[-1], np.inf))
    assert achieved == 0.0
    assert ok is False
    assert threshold_for_fmr([], 0.01) == (None, None, False)
    with pytest.raises(ValueError, match="sorted"):
        threshold_for_fmr([0.3, 0.1], 0.01)


# ---------------------------------------------------------------------------------------------------------
# Extrapolation and intervals


def test_fpir_fmr_round_trip() -> None:
    assert fpir_from_fmr(0.5, 2) == pytest.approx(0.75)
    assert fmr_for_fpir(0.75, 2) == pytest.approx(0.5)
    # Stable where 1 - (1 - p)^n loses every digit.
    assert fpir_from_fmr(1e-12, 1000) == pytest.approx(1e-9, rel=1e-9)
    for fmr in (1e-9, 1e-6, 1e-3, 0.2):
        for n in (1, 10, 10_000, 10_000_000):
            if fmr * n > 20:  # the FPIR rounds to 1: nothing left to invert
                continue
            assert fmr_for_fpir(fpir_from_fmr(fmr, n), n) == pytest.approx(fmr, rel=1e-9)
    assert fpir_from_fmr(0.0, 5) == 0.0
    assert fpir_from_fmr(1.0, 5) == 1.0
    assert fmr_for_fpir(1.0, 5) == 1.0
    with pytest.raises(ValueError):
        fpir_from_fmr(0.1, 0)
    with pytest.raises(ValueError):
        fmr_for_fpir(1.5, 3)


def test_clopper_pearson_known_values() -> None:
    low, high = clopper_pearson(0, 10)
    assert low == 0.0
    assert high == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-12)
    assert high == pytest.approx(0.30850, abs=1e-5)
    assert clopper_pearson(5, 10) == pytest.approx((0.18709, 0.81291), abs=1e-5)
    low, high = clopper_pearson(1, 1000)
    assert low == pytest.approx(2.53e-5, rel=1e-2)
    assert high == pytest.approx(0.00556, rel=1e-3)
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** (1 / 10), 1.0), rel=1e-12)
    assert clopper_pearson(0, 0) == (0.0, 1.0)
    low99, high99 = clopper_pearson(5, 10, confidence=0.99)
    assert low99 < 0.18709 and high99 > 0.81291
    for k, n in ((3, 17), (40, 1000)):  # symmetry
        a, b = clopper_pearson(k, n)
        c, d = clopper_pearson(n - k, n)
        assert (a, b) == pytest.approx((1 - d, 1 - c), abs=1e-12)
    with pytest.raises(ValueError):
        clopper_pearson(5, 4)
    with pytest.raises(ValueError):
        clopper_pearson(1, 10, confidence=1.0)


def test_clopper_pearson_matches_scipy_when_present() -> None:
    special = pytest.importorskip("scipy.special")  # a cross-check only: accuracy.py never imports scipy
    for k, n in ((1, 3), (7, 50), (50, 100_000), (999, 1000), (3, 2_000_000)):
        low, high = clopper_pearson(k, n)
        assert low == pytest.approx(special.betaincinv(k, n - k + 1, 0.025), rel=1e-8)
        assert high == pytest.approx(special.betaincinv(k + 1, n - k, 0.975), rel=1e-8)
        assert accuracy.betainc(k, n - k + 1, low) == pytest.approx(special.betainc(k, n - k + 1, low), rel=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Plot


def test_det_plot_is_a_png(tmp_path: Path) -> None:
    import matplotlib.image

    r = hand_result()
    v = evaluate_verification(at(0, 30, 90, 170), ["a", "a", "b", "b"])
    path = tmp_path / "plots" / "det.png"
    assert write_det_plot(path, r, v, "hand example") == path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[0] == 500
    assert image.shape[1] == 1800
    assert image.shape[2] in (3, 4)
    assert [p.name for p in path.parent.iterdir()] == ["det.png"]  # no temp file left
    # Without 1:1 and without non-mated searches (no curve) it still writes, replacing the file.
    empty = evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, np.zeros((0, 2)))
    write_det_plot(path, empty, None, "no non-mated searches")
    assert matplotlib.image.imread(path).shape[:2] == (500, 1200)
    assert [p.name for p in path.parent.iterdir()] == ["det.png"]


# ---------------------------------------------------------------------------------------------------------
# Hostile input


def test_hostile_input_raises_value_error() -> None:
    nan_gallery = GALLERY.copy()
    nan_gallery[2, 0] = np.nan
    cases = [
        lambda: evaluate_identification(nan_gallery, GALLERY_IDS, MATED, MATED_IDS, NON_MATED),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS[:-1], MATED, MATED_IDS, NON_MATED),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS[:-1], NON_MATED),
        lambda: evaluate_identification(GALLERY[0], ["A"], MATED, MATED_IDS, NON_MATED),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, np.ones((4, 3)) / math.sqrt(3), MATED_IDS, NON_MATED),
        lambda: evaluate_identification(GALLERY * 2, GALLERY_IDS, MATED, MATED_IDS, NON_MATED),  # not unit-norm
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, ["A", "C", "D", "nobody"], NON_MATED),
        lambda: evaluate_identification(GALLERY, [1, 2, 3, 4, 5, 6, 7], MATED, MATED_IDS, NON_MATED),  # type: ignore[list-item]
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, NON_MATED, mated_failed=-1),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, NON_MATED, fpir_targets=(0.0,)),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, NON_MATED, fpir_targets=(1.0,)),
        lambda: evaluate_identification(GALLERY, GALLERY_IDS, MATED, MATED_IDS, NON_MATED, ranks=(0,)),
        lambda: evaluate_identification(np.zeros((0, 2)), [], MATED, MATED_IDS, NON_MATED),
        lambda: evaluate_identification(GALLERY.astype(str), GALLERY_IDS, MATED, MATED_IDS, NON_MATED),
        lambda: evaluate_verification(np.array([[np.inf, 0.0]]), ["a"]),
        lambda: evaluate_verification(at(0, 10), ["a"]),
        lambda: evaluate_verification(at(0, 10), "ab"),
        lambda: verification_from_scores([0.1, np.nan], [0.2]),
        lambda: identification_from_scores([0.5], [1, 2], [0.1], gallery_size=3),
        lambda: identification_from_scores([0.5], [4], [0.1], gallery_size=3),
        lambda: threshold_for_fmr([0.1, np.nan], 0.1),
        lambda: clopper_pearson(-1, 10),
    ]
    for i, case in enumerate(cases):
        with pytest.raises(ValueError):
            case()
            pytest.fail(f"case {i} did not raise")


# ---------------------------------------------------------------------------------------------------------
# Properties

scores = st.integers(min_value=-8, max_value=8).map(lambda i: i / 8)  # a coarse grid: plenty of ties


@settings(max_examples=60, deadline=None)
@given(
    mated=st.lists(scores, max_size=30),
    non_mated=st.lists(scores, min_size=1, max_size=60),
    failed=st.integers(min_value=0, max_value=3),
    targets=st.lists(st.floats(min_value=1e-4, max_value=0.99), min_size=1, max_size=6, unique=True),
)
def test_fnir_is_monotone_in_the_fpir_target(
    mated: list[float], non_mated: list[float], failed: int, targets: list[float]
) -> None:
    targets = sorted(targets)
    r = identification_from_scores(
        mated, [1] * len(mated), non_mated, gallery_size=1, mated_failed=failed, fpir_targets=targets
    )
    fnirs = [r.fnir_at_fpir[f] for f in targets]
    if len(mated) + failed == 0:
        assert fnirs == [None] * len(targets)
        return
    assert all(a is not None and b is not None and a >= b for a, b in pairwise(fnirs))
    for f in targets:
        t, achieved = r.threshold_at_fpir[f], r.fpir_at_threshold[f]
        assert t is not None and achieved is not None
        assert achieved <= f
        below = r.fpir(float(np.nextafter(t, -np.inf)))
        assert below is not None and below > f  # the smallest such threshold
        assert r.resolvable[f] is (len(non_mated) * f >= 1)


@settings(max_examples=60, deadline=None)
@given(genuine=st.lists(scores, max_size=25), impostor=st.lists(scores, max_size=25))
def test_auc_matches_brute_force(genuine: list[float], impostor: list[float]) -> None:
    v = verification_from_scores(genuine, impostor)
    if not genuine or not impostor:
        assert v.auc is None and v.eer is None
        return
    wins = sum((g > i) + 0.5 * (g == i) for g in genuine for i in impostor)
    assert v.auc == pytest.approx(wins / (len(genuine) * len(impostor)), abs=1e-12)
    assert v.eer is not None and 0.0 <= v.eer <= 1.0
    # At the EER threshold's bracketing sweep points, FMR and FNMR straddle the EER.
    t, fmr, fnmr = v.det_curve()
    assert len(t) == len(set(genuine) | set(impostor))
    assert np.all(np.diff(fmr) <= 0) and np.all(np.diff(fnmr) >= 0)
