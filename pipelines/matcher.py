"""Exact top-K: a cheap filter with a proven error bound over every gallery block, then exact rescoring.

For each block of gallery vectors, one matrix product (`filter_product`) gives approximate scores for every
probe-gallery pair, int8 or float32: `choose_filter_kernel` (the CPU probing is in `pipelines.kernels`) picks
int8 only on a CPU that runs it measurably faster than float32 BLAS (about twice on AVX-512 VNNI, ~80x slower on
AVX2 alone), for batches of INT8_MIN_PROBES probes or more, and float32 elsewhere. Each approximate score
is within a bound `b` of the true dot product, and the bound is computed, not assumed (see `ProbeSet`).
A pair can belong to a probe's final top K only if its true score reaches the probe's running k-th best
exact score `thr`, so every pair with `approx >= thr - b` is kept and every other pair is provably out.
The survivors (a few per probe once `thr` has settled) are rescored exactly: the float32 rounding of a
float64 dot product of the float32 vectors. That one scoring function is used for every candidate, so
the scores, and hence the ranking and the ties, do not depend on block sizes, engines or devices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

FILTER_KERNELS = ("int8", "float32")
RESCORE_CHUNK = 1024  # pairs rescored at once (small gathers stay in cache: measured fastest)
EPS32 = 2.0**-24  # float32 unit roundoff
EPS_TF32 = 2.0**-11  # inputs rounded to TF32 when a GPU is allowed to use it
INT8_MIN_PROBES = 256  # below this, quantising each block costs what the int8 product saves (measured)
SLACK = 1e-6  # absolute margin for the bound's own float arithmetic
MARGIN = 1e-3  # relative margin on computed norms and on the int8 step (float32 norms err by up to d * u)


@dataclass
class TopK:
    """Running candidates of every probe: the k best exact scores plus every candidate tied with the k-th.

    Kept as flat arrays (probe, score, row id), sorted by probe then score descending after `compact`.
    Keeping all boundary ties (instead of an arbitrary subset) is what makes merges exact: the final
    order (score desc, gallery id asc) is decided once ids are known, in `ranked`.
    """

    n_probes: int
    k: int
    probe: np.ndarray = field(init=False)
    score: np.ndarray = field(init=False)
    rowid: np.ndarray = field(init=False)
    thr: np.ndarray = field(init=False)  # per probe: the k-th best exact score so far, -inf below k candidates
    _pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)
    _pending_rows: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.probe = np.zeros(0, np.int64)
        self.score = np.zeros(0, np.float32)
        self.rowid = np.zeros(0, np.int64)
        self.thr = np.full(self.n_probes, -np.inf, np.float32)

    def add(self, probe: np.ndarray, score: np.ndarray, rowid: np.ndarray) -> None:
        """Exact-scored candidates (flat arrays); each gallery row must be added at most once per probe."""
        if len(probe):
            self._pending.append((probe.astype(np.int64), score.astype(np.float32), rowid.astype(np.int64)))
            self._pending_rows += len(probe)
        cold = bool(self._pending_rows) and bool(np.isneginf(self.thr).any())
        if cold or self._pending_rows >= max(1024, len(self.probe) // 4):
            self.compact()

    def compact(self) -> None:
        """Fold pending candidates in: per probe, the k best and every candidate tied with the k-th."""
        if not self._pending:
            return
        probe = np.concatenate([self.probe, *(p for p, _, _ in self._pending)])
        score = np.concatenate([self.score, *(s for _, s, _ in self._pending)])
        rowid = np.concatenate([self.rowid, *(r for _, _, r in self._pending)])
        self._pending, self._pending_rows = [], 0
        order = np.lexsort((-score, probe))
        probe, score, rowid = probe[order], score[order], rowid[order]
        starts = np.searchsorted(probe, np.arange(self.n_probes))
        counts = np.diff(np.append(starts, len(probe)))
        full = counts >= self.k
        kth = np.full(self.n_probes, -np.inf, np.float32)
        kth[full] = score[starts[full] + self.k - 1]
        keep = score >= kth[probe]
        self.probe, self.score, self.rowid = probe[keep], score[keep], rowid[keep]
        self.thr = kth

    def merge(self, other: TopK) -> None:
        other.compact()
        self.add(other.probe, other.score, other.rowid)
        self.compact()

    def candidates(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """All kept candidates of one probe (k best and boundary ties), by score descending."""
        self.compact()
        lo, hi = np.searchsorted(self.probe, [row, row + 1])
        return self.score[lo:hi], self.rowid[lo:hi]

    def all_rowids(self) -> np.ndarray:
        self.compact()
        return np.unique(self.rowid)


@dataclass
class ProbeSet:
    """The probes of one unit of work, prepared once: unit-normalised, and quantised for the int8 filter.

    The int8 filter's bound, for a probe q = s q8 + e (int8 q8, scale s, residual e) and a gallery vector
    g = t g8 + f (one scale t per block, so |f_i| <= t / 2):
        q.g - s t (q8.g8) = (s q8).f + e.g,   so   |error| <= ||s q8||_1 t / 2 + ||e||_2 max ||g||_2.
    The float32 filter's bound is the classical one for a float32 dot product of length d:
        |error| <= gamma_d ||q||_2 max ||g||_2,  gamma_d = d u / (1 - d u).
    """

    exact: np.ndarray  # (Q, d) float32, unit rows (zero rows stay zero)
    device: str
    mode: str  # "int8" or "float32"
    tensor: Any  # the filter's probe matrix on the device
    norm: np.ndarray  # (Q,) ||q||_2
    scale: np.ndarray | None = None  # (Q,) s, int8 mode
    l1: np.ndarray | None = None  # (Q,) ||s q8||_1
    resid: np.ndarray | None = None  # (Q,) ||e||_2
    _buffers: dict[str, Any] = field(default_factory=dict, repr=False)

    def buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        """A work array reused across blocks (views of one allocation per name, grown when needed)."""
        import torch

        size = int(np.prod(shape))
        held = self._buffers.get(name)
        if held is None or held.numel() < size or held.dtype != dtype:
            device = self.device if name == "scores" else "cpu"
            held = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return held[:size].view(shape)

    @classmethod
    def build(cls, probes: np.ndarray, device: str = "cpu", mode: str = "auto") -> ProbeSet:
        """Probes for the `mode` filter: "auto" (`choose_filter_kernel`), "int8" (CPU only) or "float32"."""
        import torch

        mode = choose_filter_kernel(len(probes), device) if mode == "auto" else mode
        if mode not in FILTER_KERNELS or (mode == "int8" and device != "cpu"):
            raise ValueError(f"filter kernel {mode!r} on {device}: use 'float32', or 'int8' on cpu")
        exact = unit_rows(probes)
        exact64 = exact.astype(np.float64)
        norm = np.linalg.norm(exact64, axis=1)
        if mode == "float32":
            return cls(exact, device, mode, torch.from_numpy(exact).to(device), norm)
        peak = np.abs(exact64).max(axis=1, initial=0.0)
        scale = np.where(peak > 0, peak / 127.0, 1.0)
        q8 = np.clip(np.rint(exact64 / scale[:, None]), -127, 127).astype(np.int8)
        dequant = q8.astype(np.float64) * scale[:, None]
        l1 = np.abs(dequant).sum(axis=1)
        resid = np.linalg.norm(exact64 - dequant, axis=1)
        return cls(exact, device, mode, torch.from_numpy(q8), norm, scale, l1, resid)


def choose_filter_kernel(n_probes: int, device: str = "cpu") -> str:
    """The filter kernel, "int8" or "float32", for `n_probes` probes on `device` (`pipelines.kernels` decides)."""
    from pipelines.kernels import choose_filter_kernel as choose  # the worker's CPU facts and timed probe

    return choose(n_probes, device)


def unit_rows(probes: np.ndarray) -> np.ndarray:
    """Unit-normalised float32 rows; a zero row stays zero."""
    mat = np.asarray(probes, dtype=np.float32)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return np.ascontiguousarray(mat / norms, dtype=np.float32)


def exact_scores(probes: np.ndarray, gallery: np.ndarray, qi: np.ndarray, gi: np.ndarray) -> np.ndarray:
    """The one scoring function: float32(sum of float64 products), pair by pair, in bounded chunks.

    Products of float32 values are exact in float64, so the float32 rounding of the sum does not depend
    on how pairs are grouped: a block size, an engine or a device cannot change a score.
    """
    out = np.empty(len(qi), np.float32)
    for lo in range(0, len(qi), RESCORE_CHUNK):
        hi = min(len(qi), lo + RESCORE_CHUNK)
        out[lo:hi] = np.einsum("ij,ij->i", probes[qi[lo:hi]], gallery[gi[lo:hi]], dtype=np.float64)
    return out


def score_block(
    probes: ProbeSet, top: TopK, vectors: np.ndarray, rowids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates of one gallery block that may reach a probe's top K, exactly rescored: (probe, score, rowid)."""
    if len(vectors) == 0 or len(probes.exact) == 0:
        empty = np.zeros(0, np.int64)
        return empty, np.zeros(0, np.float32), empty
    gallery = np.ascontiguousarray(vectors, dtype=np.float32)
    approx, unit, bound = filter_product(probes, gallery)  # approx * unit[:, None] ~ scores, within bound
    floor = top.thr.astype(np.float64)  # a lower bound of each probe's final k-th exact score
    seed_q, seed_g = _seed(approx, floor, top.k)
    if len(seed_q):
        seeded = exact_scores(probes.exact, gallery, seed_q, seed_g)
        lowest = np.full(len(floor), np.inf)
        np.minimum.at(lowest, seed_q, seeded.astype(np.float64))
        floor = np.where(np.isinf(lowest), floor, np.maximum(floor, lowest))
    qi, gi = _survivors(approx, _cutoffs(unit, floor - bound, approx.dtype.is_floating_point), probes)
    return qi, exact_scores(probes.exact, gallery, qi, gi), rowids[gi]


def _seed(approx: Any, floor: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For probes with no k-th score yet: the block's k best by the filter (k real candidates, so the
    lowest of their exact scores bounds the final k-th from below)."""
    import torch

    cold = np.flatnonzero(np.isneginf(floor))
    if len(cold) == 0 or approx.shape[1] < k:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = torch.from_numpy(cold).to(approx.device)
    if _by_column(approx):  # the (B, Q) product in memory: top k down its columns (~2x faster than gathering rows)
        product = approx.T
        best = torch.topk(product if len(cold) == product.shape[1] else product[:, rows], k, dim=0).indices.T
    else:
        best = torch.topk(approx[rows], k, dim=1).indices
    return np.repeat(cold, k), best.cpu().numpy().astype(np.int64).reshape(-1)


def filter_product(probes: ProbeSet, gallery: np.ndarray) -> tuple[Any, np.ndarray, np.ndarray]:
    """The filter's matrix product, the factor that turns each of its rows into scores, and the bound.

    The product is written into a buffer reused from block to block: a fresh (Q, B) array per block costs
    page faults on every block, and a block-sized result small enough to stay in cache keeps the passes
    over it cheap.
    """
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; the block is only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        block = torch.from_numpy(gallery)
    gmax = float(torch.linalg.vector_norm(block, dim=1).amax()) * (1 + MARGIN)
    rounding = 4 * EPS32 * probes.norm * gmax  # exact scores are float32-rounded: a candidate at the k-th
    # score may be that much above its true dot product
    rows = len(gallery)
    if probes.mode == "float32":
        block = block.to(probes.device)
        d = gallery.shape[1]
        tf32 = probes.device != "cpu" and bool(torch.backends.cuda.matmul.allow_tf32)
        gamma = d * EPS32 / (1 - d * EPS32) + (2 * EPS_TF32 if tf32 else 0.0)
        bound = gamma * probes.norm * gmax + rounding + SLACK
        # (rows, Q) in memory, returned as its (Q, rows) transposed view: BLAS runs this orientation ~15% faster
        # on an AVX2 EPYC (measured), and the bound holds for any order of summation
        out = probes.buffer("scores", (rows, len(probes.exact)), torch.float32)
        return torch.mm(block, probes.tensor.T, out=out).T, np.ones(len(probes.exact)), bound
    assert probes.scale is not None and probes.l1 is not None and probes.resid is not None
    low, high = torch.aminmax(block)
    peak = max(-float(low), float(high))
    step = peak / 127.0 if peak > 0 else 1.0
    scaled = torch.mul(block, 1.0 / step, out=probes.buffer("scaled", tuple(block.shape), torch.float32))
    g8 = probes.buffer("g8", tuple(block.shape), torch.int8)
    g8.copy_(scaled.round_())  # |block / step| <= 127 by the choice of step
    # |g / step - g8| <= 1/2 plus the float32 rounding of g * (1 / step): covered by MARGIN
    bound = probes.l1 * step / 2 * (1 + MARGIN) + probes.resid * gmax + rounding + SLACK
    out = probes.buffer("scores", (len(probes.exact), rows), torch.int32)
    return torch._int_mm(probes.tensor, g8.T, out=out), probes.scale * step, bound


def _cutoffs(unit: np.ndarray, need: np.ndarray, floating: bool) -> np.ndarray:
    """Per probe, the least filter value a pair needs: approx * unit >= need, made conservative."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cut = np.where(unit > 0, need / np.where(unit > 0, unit, 1.0), np.where(need <= 0, -np.inf, np.inf))
    if floating:
        return np.nextafter(cut, -np.inf)
    return np.floor(cut) - 1


def _survivors(approx: Any, cut: np.ndarray, probes: ProbeSet | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probe, column) of every pair at or above its probe's cutoff, by probe then column: one compare pass
    over the block, into a boolean buffer reused from block to block (`probes`) where there is one."""
    import torch

    if approx.dtype.is_floating_point:
        limits = np.clip(cut, -3e38, 3e38).astype(np.float32)
    else:
        limits = np.clip(cut, -(2**31), 2**31 - 1).astype(np.int64).astype(np.int32)
    if approx.device.type != "cpu":
        hits = (approx >= torch.from_numpy(limits).to(approx.device)[:, None]).nonzero()
        return hits[:, 0].cpu().numpy().astype(np.int64), hits[:, 1].cpu().numpy().astype(np.int64)
    # numpy's compare and flatnonzero are the fast ones on CPU; a fresh (Q, B) mask per block costs page faults
    by_column = _by_column(approx)
    values = approx.T.numpy() if by_column else approx.numpy()
    wide = limits[None, :] if by_column else limits[:, None]
    mask = None if probes is None else probes.buffer("hits", values.shape, torch.bool).numpy()
    flat = np.flatnonzero(np.greater_equal(values, wide, out=mask))
    major, minor = np.divmod(flat, values.shape[1])
    if not by_column:
        return major.astype(np.int64), minor.astype(np.int64)
    order = np.argsort(minor, kind="stable")  # (column, probe) order to (probe, column): as the (Q, B) layout
    return minor[order].astype(np.int64), major[order].astype(np.int64)


def _by_column(approx: Any) -> bool:
    """Whether the (Q, B) filter product is the transposed view of a (B, Q) array (the float32 filter's)."""
    return not approx.is_contiguous() and approx.T.is_contiguous()


def ranked(top: TopK, row: int, gallery_ids: dict[int, str], k: int) -> list[tuple[float, int]]:
    """The final ranking of one probe: score desc, then gallery id asc; at most k."""
    scores, rowids = top.candidates(row)
    pairs = sorted(zip(scores.tolist(), rowids.tolist(), strict=True), key=lambda p: (-p[0], gallery_ids[p[1]]))
    return pairs[:k]
