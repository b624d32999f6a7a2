"""NIST FRTE-style accuracy figures of a face matcher, from embeddings or scores. Engine-free: numpy and the
standard library only (matplotlib is imported lazily, by `write_det_plot` alone); no I/O but that plot.

Scores. A score is the cosine similarity of two unit-norm embeddings, i.e. their dot product, computed in
float64 (the products of float32 values are exact in float64) pair by pair with one fixed summation
(`pair_scores`, np.einsum "ij,ij->i", as `pipelines.matcher.exact_scores` does before its float32 rounding).
So a score does not depend on block sizes or on which other vectors are scored with it, and identical vectors
get identical scores: ties are exact. Searches use a float64 matrix product only as a filter, with a margin
(SCORE_MARGIN_ULPS * d * 2^-53) above its rounding error, and rescore every pair the margin cannot settle.
Inputs are checked to be 2-D, finite and unit-norm (within 1e-3); a threshold t "accepts" a score s when s >= t.

1:N identification (`evaluate_identification`). A gallery of G enrolled entries, each labelled with an identity
(an identity may have several entries). A *mated* search is a probe whose identity is enrolled; a *non-mated*
search is a probe whose identity is not. `mated_failed` counts mated probes in which no face was found: each
is a mated search that misses at every rank and every threshold (it is in every mated denominator).

* Mate score of a mated search: the highest score between the probe and any gallery entry of its identity.
* Rank of the mate (pessimistic under ties): 1 + the number of gallery entries of other identities whose score
  is >= the mate score, i.e. 1 + (entries scoring strictly higher) + (other entries scoring equal). With one
  entry per identity these are all the other gallery entries. A mate tied at the boundary of the top r with
  other entries therefore counts as a miss at rank r unless all of the tied entries fit.
* Rank-r hit rate (investigation mode, no threshold) = #{mated searches with a face whose mate rank <= r}
  / (M + mated_failed).
* Non-mated top score: the highest score of a non-mated probe over the whole gallery.
* FPIR(t) = #{non-mated searches whose top score >= t} / U.
* FNIR(t) = (#{mated searches with a face whose mate score < t} + mated_failed) / (M + mated_failed). The mate
  only has to reach t, wherever it ranks: NIST's "FNIR at rank L = G".
* For an FPIR target f: threshold_at_fpir[f] is the smallest threshold t with FPIR(t) <= f. Since FPIR only
  changes at observed non-mated top scores, t is the float64 just above (np.nextafter towards +inf) the
  (k+1)-th highest non-mated top score, where k is the largest integer with k / U <= f. Reported with it:
  fnir_at_fpir[f] = FNIR(t), fpir_at_threshold[f] = FPIR(t) (the achieved FPIR, <= f) and
  resolvable[f] = (U * f >= 1). With U < 1/f no non-mated search may be accepted (k = 0), so the achieved FPIR
  is 0 only because too few searches were made: the numbers are still reported but resolvable is False.
  With U = 0 the threshold, the achieved FPIR and the FNIR are None, and resolvable is False.
* Score distributions: genuine = the mate scores of the mated searches with a face; impostor = the non-mated
  top scores. Each is summarised by count, mean, population std (ddof=0), min, max and the 0.01 / 0.5 / 0.99
  quantiles (numpy's default linear interpolation); all None when empty.

1:1 verification (`evaluate_verification`). Over all unordered pairs i < j of n embeddings: *genuine* when the
two share an identity, *impostor* otherwise.

* FMR(t) = #{impostor scores >= t} / #impostor; FNMR(t) = #{genuine scores < t} / #genuine.
* AUC = P(random genuine score > random impostor score) + 1/2 P(equal): the Mann-Whitney U statistic divided
  by #genuine * #impostor, computed exactly from average ranks (ties share the mean of their ranks), in
  O(P log P) for P pairs.
* EER: the sweep runs over every distinct score t_1 < ... < t_K, then t_{K+1} = nextafter(t_K, +inf)
  (where FMR = 0 and FNMR = 1). d(t) = FMR(t) - FNMR(t) is non-increasing, d(t_1) = 1 and d(t_{K+1}) = -1. At the
  first sweep point j with d(t_j) <= 0: if d(t_j) = 0, EER = FMR(t_j); otherwise the crossing lies between t_{j-1}
  and t_j and EER = FMR(t_{j-1}) + a * (FMR(t_j) - FMR(t_{j-1})) with a = d(t_{j-1}) / (d(t_{j-1}) - d(t_j)),
  the point where the straight lines joining the two sweep points cross (the same value on the FNMR line).
  `eer_threshold` is t_{j-1} + a * (t_j - t_{j-1}).
* With no genuine pair (every identity has one photo) or no impostor pair (a single identity) AUC, EER and its
  threshold are None.
* `threshold_for_fmr(impostor_scores_sorted, fmr)`: the smallest t with FMR(t) <= fmr, chosen like
  threshold_at_fpir, with the achieved FMR and resolvable = (#impostor * fmr >= 1).

Gallery-size extrapolation (estimates, NIST's independence approximation: a non-mated search over N entries is
N independent impostor comparisons): FPIR(N) ~ 1 - (1 - FMR)^N (`fpir_from_fmr`) and its inverse
FMR ~ 1 - (1 - FPIR)^(1/N) (`fmr_for_fpir`), both computed stably with expm1 / log1p. Real galleries are not
independent trials (look-alikes, twins, duplicates), so a measured FPIR is preferred wherever one exists.

Uncertainty: `clopper_pearson(k, n)` is the exact (conservative) binomial interval of a rate k / n, from the
beta quantiles, computed here (regularized incomplete beta by continued fraction, inverted by bisection).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipelines.files import write_atomically

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

DEFAULT_FPIR_TARGETS = (0.01, 0.001)
DEFAULT_RANKS = (1, 5)
QUANTILES = (0.01, 0.5, 0.99)
UNIT_NORM_TOLERANCE = 1e-3  # |norm - 1| allowed for an embedding (float32 rounding and stored vectors)
BLOCK_ELEMENTS = 1 << 22  # scores held at once while searching (32 MiB of float64)
PAIR_CHUNK = 8192  # pairs rescored at once
# |matrix product - pair score| <= 2 * gamma_d * (1 + UNIT_NORM_TOLERANCE)^2 < 2.1 * d * 2^-53 for unit-norm
# rows, whatever the summation order of either; 4 gives a factor ~2 to spare.
SCORE_MARGIN_ULPS = 4.0


# ---------------------------------------------------------------------------------------------------------
# Formatting and validation


def fpir_key(f: float) -> str:
    """The JSON key of a rate target: "0.01", "0.001", "0.0001", "1e-05" (the shortest exact float repr)."""
    return repr(float(f))


def _as_embeddings(name: str, value: Any, dim: int | None = None) -> FloatArray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # any conversion failure is a bad input
        raise ValueError(f"{name}: not an array ({exc})") from exc
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected a real floating array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array (rows, dim), got shape {arr.shape}")
    if len(arr) == 0:  # no rows: any width will do (an empty stack often has a default one)
        return np.zeros((0, dim if dim is not None else max(1, arr.shape[1])), np.float64)
    if arr.shape[1] == 0:
        raise ValueError(f"{name}: embeddings have dimension 0")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name}: dimension {arr.shape[1]} does not match the gallery's {dim}")
    out = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if len(out):
        norms = np.sqrt(np.einsum("ij,ij->i", out, out))
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
        if len(bad):
            i = int(bad[0])
            raise ValueError(
                f"{name}: row {i} has norm {norms[i]:.6g}; embeddings must be unit-norm (score = cosine = dot)"
            )
    return out


def _as_ids(name: str, ids: Any, n: int) -> list[str]:
    if isinstance(ids, str | bytes):
        raise ValueError(f"{name}: expected a sequence of identity labels, got a single string")
    try:
        out = list(ids)
    except TypeError as exc:
        raise ValueError(f"{name}: expected a sequence of identity labels") from exc
    if len(out) != n:
        raise ValueError(f"{name}: {len(out)} labels for {n} embeddings")
    for i, v in enumerate(out):
        if not isinstance(v, str):
            raise ValueError(f"{name}: label {i} is {type(v).__name__}, expected str")
    return out


def _as_scores(name: str, value: Any) -> FloatArray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # any conversion failure is a bad input
        raise ValueError(f"{name}: not an array ({exc})") from exc
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name}: expected real scores, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of scores, got shape {arr.shape}")
    out = np.array(arr, dtype=np.float64)
    if not np.isfinite(out).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def _as_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: expected a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative integer, got {value}")
    return int(value)


def _as_rate(name: str, value: Any, *, open_low: bool = True, open_high: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    low_ok = v > 0.0 if open_low else v >= 0.0
    high_ok = v < 1.0 if open_high else v <= 1.0
    if not (math.isfinite(v) and low_ok and high_ok):
        lo, hi = "(" if open_low else "[", ")" if open_high else "]"
        raise ValueError(f"{name}: expected a rate in {lo}0, 1{hi}, got {value!r}")
    return v


def _targets(fpir_targets: Iterable[float]) -> tuple[float, ...]:
    out = tuple(_as_rate("fpir_targets", f) for f in fpir_targets)
    if len(set(out)) != len(out):
        raise ValueError(f"fpir_targets: duplicate targets in {out}")
    return out


def _ranks(ranks: Iterable[int]) -> tuple[int, ...]:
    out = []
    for r in ranks:
        if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
            raise ValueError(f"ranks: expected positive integers, got {r!r}")
        out.append(int(r))
    if len(set(out)) != len(out):
        raise ValueError(f"ranks: duplicate ranks in {tuple(out)}")
    return tuple(out)


def _readonly(arr: npt.NDArray[Any]) -> npt.NDArray[Any]:
    arr.setflags(write=False)
    return arr


# ---------------------------------------------------------------------------------------------------------
# Shared statistics


@dataclass(frozen=True)
class ScoreSummary:
    """count, mean, population std, min, max and the QUANTILES of a set of scores (None when empty)."""

    count: int
    mean: float | None
    std: float | None
    min: float | None
    max: float | None
    quantiles: Mapping[float, float | None]

    @classmethod
    def of(cls, scores: FloatArray) -> ScoreSummary:
        if len(scores) == 0:
            return cls(0, None, None, None, None, dict.fromkeys(QUANTILES))
        qs = np.quantile(scores, QUANTILES)
        return cls(
            count=len(scores),
            mean=float(np.mean(scores)),
            std=float(np.std(scores)),
            min=float(np.min(scores)),
            max=float(np.max(scores)),
            quantiles={q: float(v) for q, v in zip(QUANTILES, qs, strict=True)},
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min,
            "max": self.max,
            "quantiles": {fpir_key(q): v for q, v in self.quantiles.items()},
        }


def _threshold_at_rate(ascending: FloatArray, rate: float) -> tuple[float, float, bool]:
    """Smallest threshold t with #{s >= t} / n <= rate, over ascending scores (n >= 1): (t, achieved, resolvable)."""
    n = len(ascending)
    k = min(n - 1, math.floor(rate * n))  # the most accepted scores allowed: the largest k with k / n <= rate
    while k + 1 <= n - 1 and (k + 1) / n <= rate:
        k += 1
    while k > 0 and k / n > rate:
        k -= 1
    t = float(np.nextafter(ascending[n - 1 - k], np.inf))  # just above the (k+1)-th highest score
    achieved = (n - int(np.searchsorted(ascending, t, side="left"))) / n
    return t, achieved, n * rate >= 1


def threshold_for_fmr(impostor_scores_sorted: Any, fmr: float) -> tuple[float | None, float | None, bool]:
    """(threshold, achieved FMR, resolvable) for a per-pair FMR target, from impostor scores sorted ascending.

    The threshold is the smallest t with #{impostor >= t} / n <= fmr (the float64 just above an observed score);
    resolvable = n * fmr >= 1. No impostor scores: (None, None, False).
    """
    scores = _as_scores("impostor_scores_sorted", impostor_scores_sorted)
    rate = _as_rate("fmr", fmr)
    if len(scores) == 0:
        return None, None, False
    if np.any(np.diff(scores) < 0):
        raise ValueError("impostor_scores_sorted: scores are not sorted ascending")
    return _threshold_at_rate(scores, rate)


def _accept_rate(ascending: FloatArray, t: float) -> float:
    """#{s >= t} / n over ascending scores (n >= 1)."""
    return (len(ascending) - int(np.searchsorted(ascending, t, side="left"))) / len(ascending)


# ---------------------------------------------------------------------------------------------------------
# 1:N identification


@dataclass(frozen=True, eq=False)
class IdentificationResult:
    """1:N accuracy of one evaluation; the definitions are in the module docstring.

    Dicts are keyed by the FPIR target (a float) or the rank (an int). `mated_scores` / `mated_ranks` hold the
    mated searches with a face (M of them; `mated_failed` more had none), `non_mated_scores` the U non-mated
    top scores, each sorted ascending (the pairing with searches is not kept: only the distributions matter).
    """

    gallery_size: int
    mated_searches: int  # M + mated_failed
    mated_failed: int
    non_mated_searches: int  # U
    fpir_targets: tuple[float, ...]
    ranks: tuple[int, ...]
    rank_hit_rate: Mapping[int, float | None]
    threshold_at_fpir: Mapping[float, float | None]
    fnir_at_fpir: Mapping[float, float | None]
    fpir_at_threshold: Mapping[float, float | None]
    resolvable: Mapping[float, bool]
    mated_scores: FloatArray
    mated_ranks: IntArray
    non_mated_scores: FloatArray
    genuine: ScoreSummary
    impostor: ScoreSummary

    def fpir(self, threshold: float) -> float | None:
        """FPIR(t): the fraction of non-mated searches whose top score >= t (None without non-mated searches)."""
        if self.non_mated_searches == 0:
            return None
        return _accept_rate(self.non_mated_scores, float(threshold))

    def fnir(self, threshold: float) -> float | None:
        """FNIR(t): the fraction of mated searches (failed ones included) whose mate score < t."""
        if self.mated_searches == 0:
            return None
        below = int(np.searchsorted(self.mated_scores, float(threshold), side="left"))
        return (below + self.mated_failed) / self.mated_searches

    def hit_rate(self, rank: int) -> float | None:
        """Rank-r hit rate (failed mated searches are misses); None without mated searches."""
        r = _ranks([rank])[0]
        if self.mated_searches == 0:
            return None
        return int(np.searchsorted(self.mated_ranks, r, side="right")) / self.mated_searches

    def det_curve(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(thresholds, FPIR, FNIR) at every distinct observed score, ascending thresholds; empty when either
        search set is empty."""
        if self.non_mated_searches == 0 or self.mated_searches == 0:
            empty = np.zeros(0, np.float64)
            return empty, empty.copy(), empty.copy()
        t = np.unique(np.concatenate([self.mated_scores, self.non_mated_scores]))
        fpir = (len(self.non_mated_scores) - np.searchsorted(self.non_mated_scores, t, side="left")) / len(
            self.non_mated_scores
        )
        fnir = (np.searchsorted(self.mated_scores, t, side="left") + self.mated_failed) / self.mated_searches
        return t, fpir.astype(np.float64), fnir.astype(np.float64)

    def to_json(self) -> dict[str, Any]:
        """Plain dicts of float / int / bool / None (targets keyed by `fpir_key`, ranks as "rank<r>")."""
        out: dict[str, Any] = {
            "gallery_size": self.gallery_size,
            "mated_searches": self.mated_searches,
            "mated_failed": self.mated_failed,
            "non_mated_searches": self.non_mated_searches,
        }
        for r in self.ranks:
            out[f"rank{r}"] = self.rank_hit_rate[r]
        for name in ("fnir_at_fpir", "threshold_at_fpir", "fpir_at_threshold", "resolvable"):
            values: Mapping[float, Any] = getattr(self, name)
            out[name] = {fpir_key(f): values[f] for f in self.fpir_targets}
        out["genuine"] = self.genuine.to_json()
        out["impostor"] = self.impostor.to_json()
        return out


def identification_from_scores(
    mated_scores: Any,
    mated_ranks: Any,
    non_mated_scores: Any,
    *,
    gallery_size: int,
    mated_failed: int = 0,
    fpir_targets: Iterable[float] = DEFAULT_FPIR_TARGETS,
    ranks: Iterable[int] = DEFAULT_RANKS,
) -> IdentificationResult:
    """The 1:N figures from per-search scores: each mated search's mate score and pessimistic mate rank, and
    each non-mated search's top score (what `evaluate_identification` computes from embeddings)."""
    mated = _as_scores("mated_scores", mated_scores)
    non_mated = _as_scores("non_mated_scores", non_mated_scores)
    rank_arr = np.asarray(mated_ranks)
    if rank_arr.ndim != 1 or len(rank_arr) != len(mated):
        raise ValueError(f"mated_ranks: expected {len(mated)} ranks, got shape {rank_arr.shape}")
    if len(rank_arr) and (not np.issubdtype(rank_arr.dtype, np.integer) or rank_arr.min() < 1):
        raise ValueError("mated_ranks: expected positive integer ranks")
    g = _as_count("gallery_size", gallery_size)
    if len(rank_arr) and rank_arr.max() > g:
        raise ValueError(f"mated_ranks: a rank exceeds the gallery size {g}")
    failed = _as_count("mated_failed", mated_failed)
    targets = _targets(fpir_targets)
    rank_list = _ranks(ranks)

    mated_sorted = np.sort(mated)
    ranks_sorted = np.sort(rank_arr.astype(np.int64))
    non_mated_sorted = np.sort(non_mated)
    m_total = len(mated) + failed
    u = len(non_mated)

    hits: dict[int, float | None] = {}
    for r in rank_list:
        hits[r] = None if m_total == 0 else int(np.searchsorted(ranks_sorted, r, side="right")) / m_total

    thresholds: dict[float, float | None] = {}
    fnirs: dict[float, float | None] = {}
    achieved: dict[float, float | None] = {}
    resolvable: dict[float, bool] = {}
    for f in targets:
        if u == 0:
            thresholds[f], fnirs[f], achieved[f], resolvable[f] = None, None, None, False
            continue
        t, a, ok = _threshold_at_rate(non_mated_sorted, f)
        thresholds[f], achieved[f], resolvable[f] = t, a, ok
        below = int(np.searchsorted(mated_sorted, t, side="left"))
        fnirs[f] = None if m_total == 0 else (below + failed) / m_total

    return IdentificationResult(
        gallery_size=g,
        mated_searches=m_total,
        mated_failed=failed,
        non_mated_searches=u,
        fpir_targets=targets,
        ranks=rank_list,
        rank_hit_rate=hits,
        threshold_at_fpir=thresholds,
        fnir_at_fpir=fnirs,
        fpir_at_threshold=achieved,
        resolvable=resolvable,
        mated_scores=_readonly(mated_sorted),
        mated_ranks=_readonly(ranks_sorted),
        non_mated_scores=_readonly(non_mated_sorted),
        genuine=ScoreSummary.of(mated_sorted),
        impostor=ScoreSummary.of(non_mated_sorted),
    )


def _block_rows(columns: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, columns))


def _margin(dim: int) -> float:
    return SCORE_MARGIN_ULPS * dim * 2.0**-53


def pair_scores(a: FloatArray, b: FloatArray, ia: IntArray, ib: IntArray) -> FloatArray:
    """The one scoring function: float64 dot products of rows a[ia] and b[ib], pair by pair, in chunks.

    Each pair's sum is evaluated the same way wherever it is computed, so a score depends on the two vectors only.
    """
    out = np.empty(len(ia), np.float64)
    for lo in range(0, len(ia), PAIR_CHUNK):
        hi = min(len(ia), lo + PAIR_CHUNK)
        out[lo:hi] = np.einsum("ij,ij->i", a[ia[lo:hi]], b[ib[lo:hi]])
    return out


def mate_scores_and_ranks(
    gallery: FloatArray, gallery_codes: IntArray, mated: FloatArray, mated_codes: IntArray
) -> tuple[FloatArray, IntArray]:
    """Per mated probe: the mate score (best over its identity's entries) and the pessimistic rank
    1 + #{entries of other identities scoring >= the mate score}. Blocked over probes; exact pair scores."""
    scores = np.empty(len(mated), np.float64)
    ranks = np.empty(len(mated), np.int64)
    margin = _margin(gallery.shape[1])
    step = _block_rows(len(gallery))
    for lo in range(0, len(mated), step):
        hi = min(len(mated), lo + step)
        approx = mated[lo:hi] @ gallery.T
        mine = gallery_codes[None, :] == mated_codes[lo:hi, None]
        qi, gi = np.nonzero(mine)
        mate = np.full(hi - lo, -np.inf)
        np.maximum.at(mate, qi, pair_scores(mated, gallery, qi + lo, gi))
        others = ~mine
        higher = ((approx > mate[:, None] + margin) & others).sum(axis=1)
        nq, ng = np.nonzero((np.abs(approx - mate[:, None]) <= margin) & others)
        close = pair_scores(mated, gallery, nq + lo, ng)
        higher += np.bincount(nq[close >= mate[nq]], minlength=hi - lo)
        scores[lo:hi] = mate
        ranks[lo:hi] = 1 + higher
    return scores, ranks


def top_scores(gallery: FloatArray, probes: FloatArray) -> FloatArray:
    """Per probe: its highest exact score over the whole gallery (G >= 1). Blocked over probes."""
    out = np.empty(len(probes), np.float64)
    margin = _margin(gallery.shape[1])
    step = _block_rows(len(gallery))
    for lo in range(0, len(probes), step):
        hi = min(len(probes), lo + step)
        approx = probes[lo:hi] @ gallery.T
        # The exact best's approximate score is >= the approximate best - margin.
        qi, gi = np.nonzero(approx >= approx.max(axis=1)[:, None] - margin)
        top = np.full(hi - lo, -np.inf)
        np.maximum.at(top, qi, pair_scores(probes, gallery, qi + lo, gi))
        out[lo:hi] = top
    return out


def evaluate_identification(
    gallery: Any,
    gallery_ids: Sequence[str],
    mated: Any,
    mated_ids: Sequence[str],
    non_mated: Any,
    mated_failed: int = 0,
    fpir_targets: Iterable[float] = DEFAULT_FPIR_TARGETS,
    ranks: Iterable[int] = DEFAULT_RANKS,
) -> IdentificationResult:
    """1:N accuracy: gallery (G, d) with identity labels, mated probes (M, d) with their (enrolled) identities,
    non-mated probes (U, d) of identities not enrolled; all unit-norm. See the module docstring."""
    g = _as_embeddings("gallery", gallery)
    if len(g) == 0:
        raise ValueError("gallery: no entries")
    dim = g.shape[1]
    m = _as_embeddings("mated", mated, dim)
    u = _as_embeddings("non_mated", non_mated, dim)
    gids = _as_ids("gallery_ids", gallery_ids, len(g))
    mids = _as_ids("mated_ids", mated_ids, len(m))
    failed = _as_count("mated_failed", mated_failed)
    targets = _targets(fpir_targets)
    rank_list = _ranks(ranks)

    codes: dict[str, int] = {}
    gallery_codes = np.array([codes.setdefault(i, len(codes)) for i in gids], np.int64)
    missing = [i for i in mids if i not in codes]
    if missing:
        raise ValueError(f"mated_ids: {len(missing)} mated probe(s) of identities not enrolled, e.g. {missing[0]!r}")
    mated_codes = np.array([codes[i] for i in mids], np.int64)

    mate, rank = mate_scores_and_ranks(g, gallery_codes, m, mated_codes)
    return identification_from_scores(
        mate,
        rank,
        top_scores(g, u),
        gallery_size=len(g),
        mated_failed=failed,
        fpir_targets=targets,
        ranks=rank_list,
    )


# ---------------------------------------------------------------------------------------------------------
# 1:1 verification


@dataclass(frozen=True, eq=False)
class VerificationResult:
    """1:1 accuracy over all unordered pairs; scores sorted ascending. See the module docstring."""

    genuine_scores: FloatArray
    impostor_scores: FloatArray
    auc: float | None
    eer: float | None
    eer_threshold: float | None
    genuine: ScoreSummary
    impostor: ScoreSummary

    @property
    def genuine_pairs(self) -> int:
        return len(self.genuine_scores)

    @property
    def impostor_pairs(self) -> int:
        return len(self.impostor_scores)

    def fmr_at(self, threshold: float) -> float | None:
        """FMR(t) = #{impostor >= t} / #impostor (None without impostor pairs)."""
        if self.impostor_pairs == 0:
            return None
        return _accept_rate(self.impostor_scores, float(threshold))

    def fnmr_at(self, threshold: float) -> float | None:
        """FNMR(t) = #{genuine < t} / #genuine (None without genuine pairs)."""
        if self.genuine_pairs == 0:
            return None
        return int(np.searchsorted(self.genuine_scores, float(threshold), side="left")) / self.genuine_pairs

    def threshold_for_fmr(self, fmr: float) -> tuple[float | None, float | None, bool]:
        """(threshold, achieved FMR, resolvable) for a per-pair FMR target; see `threshold_for_fmr`."""
        return threshold_for_fmr(self.impostor_scores, fmr)

    def det_curve(self) -> tuple[FloatArray, FloatArray, FloatArray]:
        """(thresholds, FMR, FNMR) at every distinct score, ascending; empty when a class is empty."""
        if self.genuine_pairs == 0 or self.impostor_pairs == 0:
            empty = np.zeros(0, np.float64)
            return empty, empty.copy(), empty.copy()
        return _verification_sweep(self.genuine_scores, self.impostor_scores)

    def to_json(self) -> dict[str, Any]:
        return {
            "genuine_pairs": self.genuine_pairs,
            "impostor_pairs": self.impostor_pairs,
            "auc": self.auc,
            "eer": self.eer,
            "eer_threshold": self.eer_threshold,
            "genuine": self.genuine.to_json(),
            "impostor": self.impostor.to_json(),
        }


def _verification_sweep(genuine: FloatArray, impostor: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    t = np.unique(np.concatenate([genuine, impostor]))
    fmr = (len(impostor) - np.searchsorted(impostor, t, side="left")) / len(impostor)
    fnmr = np.searchsorted(genuine, t, side="left") / len(genuine)
    return t, fmr.astype(np.float64), fnmr.astype(np.float64)


def auc_mann_whitney(genuine: FloatArray, impostor: FloatArray) -> float | None:
    """P(genuine > impostor) + 1/2 P(tie), from average ranks of the pooled scores; exact up to the final division.

    Ranks are doubled so that average ranks of tie groups stay integers: 2U = sum(2 * rank of genuine) - nG(nG+1).
    """
    ng, ni = len(genuine), len(impostor)
    if ng == 0 or ni == 0:
        return None
    pooled = np.concatenate([genuine, impostor])
    order = np.argsort(pooled, kind="stable")
    ordered = pooled[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each tie group
    ends = np.r_[starts[1:], len(ordered)] - 1  # last position
    group_of = np.repeat(np.arange(len(starts)), ends - starts + 1)
    doubled = np.empty(len(pooled), np.int64)
    doubled[order] = (starts + ends + 2)[group_of]  # 2 * average 1-based rank of the group
    u2 = int(doubled[:ng].sum(dtype=np.int64)) - ng * (ng + 1)
    return u2 / (2 * ng * ni)


def equal_error_rate(genuine: FloatArray, impostor: FloatArray) -> tuple[float | None, float | None]:
    """(EER, its threshold) by the interpolated sweep of the module docstring, over ascending scores."""
    if len(genuine) == 0 or len(impostor) == 0:
        return None, None
    t, fmr, fnmr = _verification_sweep(genuine, impostor)
    t = np.r_[t, np.nextafter(t[-1], np.inf)]
    fmr = np.r_[fmr, 0.0]
    fnmr = np.r_[fnmr, 1.0]
    d = fmr - fnmr
    j = int(np.flatnonzero(d <= 0)[0])  # exists: d[-1] = -1; and j >= 1 since d[0] = 1 - 0
    if d[j] == 0:
        return float(fmr[j]), float(t[j])
    a = d[j - 1] / (d[j - 1] - d[j])
    eer = fmr[j - 1] + a * (fmr[j] - fmr[j - 1])
    return float(eer), float(t[j - 1] + a * (t[j] - t[j - 1]))


def verification_from_scores(genuine_scores: Any, impostor_scores: Any) -> VerificationResult:
    """The 1:1 figures from genuine and impostor pair scores (any order)."""
    gen = np.sort(_as_scores("genuine_scores", genuine_scores))
    imp = np.sort(_as_scores("impostor_scores", impostor_scores))
    eer, eer_t = equal_error_rate(gen, imp)
    return VerificationResult(
        genuine_scores=_readonly(gen),
        impostor_scores=_readonly(imp),
        auc=auc_mann_whitney(gen, imp),
        eer=eer,
        eer_threshold=eer_t,
        genuine=ScoreSummary.of(gen),
        impostor=ScoreSummary.of(imp),
    )


def all_pair_scores(embeddings: FloatArray, codes: IntArray) -> tuple[FloatArray, FloatArray]:
    """(genuine, impostor) exact scores of all pairs i < j, blocked over rows."""
    n = len(embeddings)
    gen: list[FloatArray] = []
    imp: list[FloatArray] = []
    step = _block_rows(n)
    cols = np.arange(n)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        qi, gi = np.nonzero(cols[None, :] > np.arange(lo, hi)[:, None])
        qi += lo
        s = pair_scores(embeddings, embeddings, qi, gi)
        same = codes[qi] == codes[gi]
        gen.append(s[same])
        imp.append(s[~same])
    empty = np.zeros(0, np.float64)
    return np.concatenate([empty, *gen]), np.concatenate([empty, *imp])


def evaluate_verification(embeddings: Any, ids: Sequence[str]) -> VerificationResult:
    """1:1 accuracy over all unordered pairs of unit-norm embeddings (n, d) labelled by identity."""
    e = _as_embeddings("embeddings", embeddings)
    labels = _as_ids("ids", ids, len(e))
    codes: dict[str, int] = {}
    code_arr = np.array([codes.setdefault(i, len(codes)) for i in labels], np.int64)
    gen, imp = all_pair_scores(e, code_arr)
    return verification_from_scores(gen, imp)


# ---------------------------------------------------------------------------------------------------------
# Gallery-size extrapolation (independence approximation)


def _as_size(n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"n: expected a positive integer gallery size, got {n!r}")
    return int(n)


def fpir_from_fmr(fmr: float, n: int) -> float:
    """Estimated FPIR of a gallery of n entries from a per-comparison FMR: 1 - (1 - fmr)^n (independence)."""
    p = _as_rate("fmr", fmr, open_low=False, open_high=False)
    size = _as_size(n)
    if p == 1.0:
        return 1.0
    return -math.expm1(size * math.log1p(-p))


def fmr_for_fpir(fpir: float, n: int) -> float:
    """The per-comparison FMR that gives FPIR `fpir` over n entries: 1 - (1 - fpir)^(1/n) (independence)."""
    p = _as_rate("fpir", fpir, open_low=False, open_high=False)
    size = _as_size(n)
    if p == 1.0:
        return 1.0
    return -math.expm1(math.log1p(-p) / size)


# ---------------------------------------------------------------------------------------------------------
# Exact binomial interval


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz), valid for x < (a+1)/(a+b+2)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = tiny if abs(d) < tiny else d
    d = 1.0 / d
    h = d
    max_iter = 10_000 + int(50 * math.sqrt(max(a, b)))
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = tiny if abs(d) < tiny else d
        c = 1.0 + aa / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), a, b > 0, 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"betainc: a and b must be positive, got {a}, {b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], got {x}")
    if x == 0.0:
        return 0.0
    if x == 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _beta_lower_quantile(p: float, a: float, b: float) -> float:
    """x with I_x(a, b) = p, by bisection to float precision (I_x is increasing in x)."""
    lo, hi = 0.0, 1.0
    for _ in range(2000):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi) or hi - lo <= 1e-15 * hi:
            break
        if betainc(a, b, mid) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided Clopper-Pearson interval of a binomial rate k / n: (low, high).

    low = the alpha/2 quantile of Beta(k, n-k+1) (0 when k = 0), high = the 1-alpha/2 quantile of Beta(k+1, n-k)
    (1 when k = n), alpha = 1 - confidence; computed without scipy. n = 0 gives (0.0, 1.0).
    """
    kk = _as_count("k", k)
    nn = _as_count("n", n)
    if kk > nn:
        raise ValueError(f"clopper_pearson: k = {kk} exceeds n = {nn}")
    level = _as_rate("confidence", confidence)
    if nn == 0:
        return 0.0, 1.0
    alpha = 1.0 - level
    low = 0.0 if kk == 0 else _beta_lower_quantile(alpha / 2, kk, nn - kk + 1)
    # The upper quantile of Beta(k+1, n-k) is 1 - the lower quantile of Beta(n-k, k+1): search small tails only.
    high = 1.0 if kk == nn else 1.0 - _beta_lower_quantile(alpha / 2, nn - kk, kk + 1)
    return low, high


# ---------------------------------------------------------------------------------------------------------
# Plot


def write_det_plot(
    path: str | os.PathLike[str],
    result: IdentificationResult,
    verification: VerificationResult | None,
    title: str,
) -> Path:
    """A PNG, written atomically: the DET curve (FNIR vs FPIR, log-log, operating points at the FPIR targets,
    labelled with their thresholds; the 1:1 FNMR vs FMR curve too when given) and the score histograms (mated
    vs non-mated top scores with the target thresholds; 1:1 genuine vs impostor when given).

    Points where a rate is 0 cannot be drawn on log axes and are left out; an unresolvable target is drawn
    hollow at its nominal FPIR. Renders with matplotlib's Agg canvas on a standalone Figure: no pyplot, no
    global backend switch, nothing left open.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    target = Path(path)
    ncols = 3 if verification is not None else 2
    fig = Figure(figsize=(6.0 * ncols, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.25 / ncols, right=0.98, bottom=0.12, top=0.86, wspace=0.28)
    fig.suptitle(title)
    det = fig.add_subplot(1, ncols, 1)
    _draw_det(det, result, verification)
    hist = fig.add_subplot(1, ncols, 2)
    _draw_hist(
        hist,
        result.mated_scores,
        result.non_mated_scores,
        ("mated (mate score)", "non-mated (top score)"),
        "1:N score distributions",
        [(f"FPIR {fpir_key(f)}", result.threshold_at_fpir[f]) for f in result.fpir_targets],
    )
    if verification is not None:
        hist11 = fig.add_subplot(1, ncols, 3)
        lines = [("EER", verification.eer_threshold)]
        _draw_hist(
            hist11,
            verification.genuine_scores,
            verification.impostor_scores,
            ("genuine pairs", "impostor pairs"),
            "1:1 score distributions",
            lines,
        )

    try:
        write_atomically(target, lambda handle: fig.savefig(handle, format="png"))
    finally:
        fig.clear()
    return target


def _draw_det(ax: Any, result: IdentificationResult, verification: VerificationResult | None) -> None:
    _, fpir, fnir = result.det_curve()
    keep = (fpir > 0) & (fnir > 0)
    drawn = False
    if keep.any():
        ax.step(fpir[keep], fnir[keep], where="post", label="1:N FNIR vs FPIR")
        drawn = True
    if verification is not None:
        _, fmr, fnmr = verification.det_curve()
        keep11 = (fmr > 0) & (fnmr > 0)
        if keep11.any():
            ax.step(fmr[keep11], fnmr[keep11], where="post", linestyle="--", label="1:1 FNMR vs FMR")
            drawn = True
    for f in result.fpir_targets:
        t, fn, fp = result.threshold_at_fpir[f], result.fnir_at_fpir[f], result.fpir_at_threshold[f]
        ax.axvline(f, color="grey", linestyle=":", linewidth=0.8)
        if t is None or fn is None or fp is None:
            continue
        ok = result.resolvable[f] and fp > 0
        x = fp if ok else f
        y = max(fn, 0.5 / max(1, result.mated_searches))
        ax.plot([x], [y], marker="o", markerfacecolor="C3" if ok else "none", markeredgecolor="C3", linestyle="")
        note = "" if result.resolvable[f] else " (unresolvable)"
        ax.annotate(
            f"FPIR {fpir_key(f)}: t={t:.4f}, FNIR={fn:.4f}{note}",
            (x, y),
            textcoords="offset points",
            xytext=(6, 6),
            fontsize=8,
        )
        drawn = True
    if drawn:
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no curve: a search set is empty", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("FPIR (non-mated searches accepted)")
    ax.set_ylabel("FNIR (mated searches missed, rank-agnostic)")
    ax.set_title(
        f"DET: G={result.gallery_size}, mated={result.mated_searches} (failed {result.mated_failed}), "
        f"non-mated={result.non_mated_searches}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower left")


def _draw_hist(
    ax: Any,
    first: FloatArray,
    second: FloatArray,
    labels: tuple[str, str],
    title: str,
    lines: Sequence[tuple[str, float | None]],
) -> None:
    both = np.concatenate([first, second])
    if len(both):
        lo, hi = float(both.min()), float(both.max())
        if hi <= lo:
            lo, hi = lo - 0.01, hi + 0.01
        bins = np.linspace(lo, hi, 51)
        for scores, label, color in ((first, labels[0], "C0"), (second, labels[1], "C1")):
            if len(scores):
                ax.hist(scores, bins=bins, density=True, alpha=0.5, color=color, label=f"{label} (n={len(scores)})")
    else:
        ax.text(0.5, 0.5, "no scores", ha="center", va="center", transform=ax.transAxes)
    for i, (name, t) in enumerate(lines):
        if t is not None:
            ax.axvline(t, color=f"C{3 + i}", linestyle="--", linewidth=1.0, label=f"{name}: t={t:.4f}")
    ax.set_xlabel("score (cosine)")
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
