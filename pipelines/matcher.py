"""Exact top-K by blocked matrix products, merged exactly across blocks and workers; ties break by gallery id."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NO_ROW = -1


@dataclass
class TopK:
    """Running candidates per probe: the k best scores, plus every candidate tied at the boundary.

    Keeping all boundary ties (instead of an arbitrary subset) is what makes the merge exact: the
    final order (score desc, gallery id asc) is decided only once ids are known, in `ranked`.
    """

    n_probes: int
    k: int
    scores: np.ndarray = field(init=False)
    rowids: np.ndarray = field(init=False)
    ties: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.scores = np.full((self.n_probes, self.k), -np.inf, dtype=np.float32)
        self.rowids = np.full((self.n_probes, self.k), NO_ROW, dtype=np.int64)

    def add(self, scores: np.ndarray, rowids: np.ndarray, ties: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Merge a block's (or a worker's) candidates: dense (Q, k') arrays plus tie sets per row."""
        cat_s = np.concatenate([self.scores, scores], axis=1)
        cat_r = np.concatenate([self.rowids, rowids], axis=1)
        order = np.argsort(-cat_s, axis=1, kind="stable")[:, : self.k]
        new_s = np.take_along_axis(cat_s, order, axis=1)
        new_r = np.take_along_axis(cat_r, order, axis=1)
        kth = new_s[:, -1:]
        crowded = ((cat_s >= kth) & (cat_r != NO_ROW)).sum(axis=1) > self.k
        slow = set(np.flatnonzero(crowded).tolist()) | set(self.ties) | set(ties)
        fast = np.ones(self.n_probes, dtype=bool)
        fast[list(slow)] = False
        self.scores[fast], self.rowids[fast] = new_s[fast], new_r[fast]
        for row in slow:
            self._merge_row(row, cat_s[row], cat_r[row], ties.get(row))

    def _merge_row(
        self, row: int, cat_s: np.ndarray, cat_r: np.ndarray, extra: tuple[np.ndarray, np.ndarray] | None
    ) -> None:
        parts_s, parts_r = [cat_s], [cat_r]
        for tied in (self.ties.get(row), extra):
            if tied is not None:
                parts_s.append(tied[0])
                parts_r.append(tied[1])
        s, r = np.concatenate(parts_s), np.concatenate(parts_r)
        keep = r != NO_ROW
        r, first = np.unique(r[keep], return_index=True)
        s = s[keep][first]
        order = np.argsort(-s, kind="stable")
        s, r = s[order], r[order]
        if len(s) > self.k:
            cut = s >= s[self.k - 1]
            s, r = s[cut], r[cut]
        self.scores[row] = -np.inf
        self.rowids[row] = NO_ROW
        n = min(self.k, len(s))
        self.scores[row, :n], self.rowids[row, :n] = s[:n], r[:n]
        if len(s) > self.k:
            self.ties[row] = (s, r)
        else:
            self.ties.pop(row, None)

    def merge(self, other: TopK) -> None:
        self.add(other.scores, other.rowids, other.ties)

    def candidates(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """All kept candidates of one probe (k best and boundary ties), unordered among ties."""
        if row in self.ties:
            return self.ties[row]
        keep = self.rowids[row] != NO_ROW
        return self.scores[row][keep], self.rowids[row][keep]

    def all_rowids(self) -> np.ndarray:
        rows = [self.rowids[self.rowids != NO_ROW]] + [r for _, r in self.ties.values()]
        return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def score_block(
    probes: Any, vectors: np.ndarray, rowids: np.ndarray, k: int, device: str = "cpu"
) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """One matrix product, then the k best per probe and every candidate tied with the k-th."""
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; the block is only ever read
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        gallery = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
    scores = probes @ gallery.T  # (Q, B): BLAS on CPU, cuBLAS on GPU
    kk = min(k, scores.shape[1])
    ties: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if kk < scores.shape[1]:
        # One extra column says which rows have more than kk scores at or above their kk-th:
        # exactly those whose (kk+1)-th score equals the kk-th. Only they need a full look.
        vals, idx = torch.topk(scores, kk + 1, dim=1)
        crowded = (vals[:, kk] == vals[:, kk - 1]).nonzero().flatten().tolist()
        vals, idx = vals[:, :kk], idx[:, :kk]
        for row in crowded:
            sel = (scores[row] >= vals[row, -1]).nonzero().flatten()
            ties[row] = (scores[row, sel].float().cpu().numpy(), rowids[sel.cpu().numpy()])
    else:
        vals, idx = torch.topk(scores, kk, dim=1)
    vals_np, idx_np = vals.float().cpu().numpy(), idx.cpu().numpy()
    return vals_np, rowids[idx_np], ties


def probe_tensor(probes: np.ndarray, device: str = "cpu") -> Any:
    """Unit-normalised float32 probe matrix on the device."""
    import torch

    mat = np.asarray(probes, dtype=np.float32)
    norms = np.linalg.norm(mat, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return torch.from_numpy(np.ascontiguousarray(mat / norms)).to(device)


def ranked(top: TopK, row: int, gallery_ids: dict[int, str], k: int) -> list[tuple[float, int]]:
    """The final ranking of one probe: score desc, then gallery id asc; at most k."""
    scores, rowids = top.candidates(row)
    pairs = sorted(zip(scores.tolist(), rowids.tolist(), strict=True), key=lambda p: (-p[0], gallery_ids[p[1]]))
    return pairs[:k]
