"""Mixed precision: choose one candidate setting per tensor (``--target-bits``, ``--target-sqnr``).

Every tensor comes with its measured candidates (e.g. bits 2..8 x group sizes), each with its
stored size in bits (sidecars included) and its relative squared error
``error_sq / signal_sq``. The loss of a choice is the size-weighted sum of relative errors,
``sum(n_weights * rel_error)``: a tensor's share of the model's error grows with its size, so
the model's total error is minimized rather than the worst layer's (``--target-sqnr`` is the
per-tensor guard for that).

Numeric core: the standard library only; candidate ids are opaque to this module.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """One way to store one tensor: its size in bits and its relative squared error."""

    id: Hashable
    size_bits: int
    rel_error: float  # error_sq / signal_sq (0 for a tensor without signal)


@dataclass(frozen=True)
class Plan:
    """The chosen candidate index of every tensor, and the totals of that choice."""

    choice: tuple[int, ...]
    ids: tuple[Hashable, ...]
    total_bits: int
    total_weights: int
    error: float  # sum(n_weights * rel_error)
    short: tuple[bool, ...] = ()  # target_sqnr: tensors that cannot reach the target

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.total_weights


def _check(candidates: Sequence[Sequence[Candidate]], n_weights: Sequence[int]) -> None:
    if len(candidates) != len(n_weights):
        raise ValueError(f"{len(candidates)} candidate lists for {len(n_weights)} tensors")
    for i, cands in enumerate(candidates):
        if not cands:
            raise ValueError(f"tensor {i} has no candidate")
        for c in cands:
            if c.size_bits < 0 or not (c.rel_error >= 0 and math.isfinite(c.rel_error)):
                raise ValueError(f"tensor {i}: invalid candidate {c!r}")
    if sum(n_weights) <= 0:
        raise ValueError("no weights to allocate bits to")


def _plan(candidates: Sequence[Sequence[Candidate]], n_weights: Sequence[int],
          choice: list[int], short: tuple[bool, ...] = ()) -> Plan:
    picked = [cands[j] for cands, j in zip(candidates, choice, strict=True)]
    return Plan(tuple(choice), tuple(c.id for c in picked), sum(c.size_bits for c in picked),
                sum(n_weights), sum(n * c.rel_error for n, c in zip(n_weights, picked,
                                                                       strict=True)), short)


def _cheapest(cands: Sequence[Candidate]) -> int:
    """The smallest candidate (the lowest error among equal sizes, then the first)."""
    return min(range(len(cands)), key=lambda j: (cands[j].size_bits, cands[j].rel_error, j))


def _hull(cands: Sequence[Candidate]) -> list[int]:
    """Indices of the lower convex hull of (size, rel_error), from the cheapest up.

    Points above the hull are never chosen by the greedy step: for every price of a bit
    (lambda) the candidate minimizing error + lambda * size is a hull vertex.
    """
    order = sorted(range(len(cands)), key=lambda j: (cands[j].size_bits, cands[j].rel_error, j))
    pts: list[int] = []
    for j in order:
        if pts and cands[j].rel_error >= cands[pts[-1]].rel_error:
            continue  # no better than something at most as large: dominated
        if pts and cands[j].size_bits == cands[pts[-1]].size_bits:
            continue  # same size, not better (the sort put the best first)
        while len(pts) >= 2:
            a, b = cands[pts[-2]], cands[pts[-1]]
            # b is above the segment a -> j (or on it): drop it. Cross-multiplied slopes.
            left = (b.rel_error - a.rel_error) * (cands[j].size_bits - a.size_bits)
            right = (cands[j].rel_error - a.rel_error) * (b.size_bits - a.size_bits)
            if left >= right:
                pts.pop()
            else:
                break
        pts.append(j)
    return pts


def allocate(candidates: Sequence[Sequence[Candidate]], n_weights: Sequence[int],
             target_bits: float, *, fill: bool = True) -> Plan:
    """The choice of least ``sum(n_weights * rel_error)`` with ``total_bits / sum(n_weights)
    <= target_bits`` (bits per weight, sidecars included as the sizes say).

    Method: every tensor starts at its cheapest candidate; the upgrades along each tensor's
    lower convex hull of (size, error) are taken globally in order of error removed per bit,
    as long as they fit (a Lagrangian sweep over the price of a bit, done exactly). Then the
    budget left over is filled: repeatedly the single change of one tensor to any candidate
    that lowers the error most per bit and still fits.

    Guarantee: before the fill, the plan is optimal among all choices whose total is at most
    its own total (it minimizes error + lambda * size for the last step's lambda; any choice
    no larger has no smaller error). The gap: the budget between that total and the target
    is where the multiple-choice knapsack is hard; a better plan can exist there, but its
    error is more than the greedy error minus the gain of the first step that did not fit
    (Lagrangian bound: error >= greedy - lambda * unused bits, lambda < gain / cost). The fill
    recovers most of it; for the tensor counts and candidate sets of a model (dozens to
    hundreds of tensors, each step a small fraction of the budget) the gap is tiny.

    ``fill=False`` returns the plan before the fill (the tests check its optimality).
    Raises ValueError when even the cheapest candidate of every tensor exceeds the budget.
    """
    _check(candidates, n_weights)
    total_w = sum(n_weights)
    # A budget beyond every tensor's largest candidate is that total (the same plan): a
    # target of 1e308 made an inf budget, and math.floor raised OverflowError (a traceback).
    most = sum(max(x.size_bits for x in c) for c in candidates)
    if target_bits * total_w >= most:
        budget = most
    else:
        budget = math.floor(target_bits * total_w + 1e-9 * total_w)  # tolerate float noise
    choice = [_cheapest(c) for c in candidates]
    used = sum(c[j].size_bits for c, j in zip(candidates, choice, strict=True))
    if used > budget:
        raise ValueError(
            f"--target-bits {target_bits:g} is below the smallest possible size: "
            f"{used / total_w:.4f} bits per weight (every tensor at its cheapest setting)"
        )
    # All hull steps of all tensors, best error-per-bit first. Along one hull the steps get
    # less efficient, so the global order never takes a tensor's step before its previous
    # one; ties go to the earlier tensor and step, which keeps the plan deterministic.
    steps = []
    for i, cands in enumerate(candidates):
        hull = _hull(cands)
        for a, b in zip(hull, hull[1:], strict=False):
            gain = n_weights[i] * (cands[a].rel_error - cands[b].rel_error)
            cost = cands[b].size_bits - cands[a].size_bits
            steps.append((-gain / cost, i, a, b))
    steps.sort(key=lambda s: (s[0], s[1]))
    for _, i, a, b in steps:
        if choice[i] != a:
            continue  # an earlier step of this tensor did not fit: later ones follow it
        cost = candidates[i][b].size_bits - candidates[i][a].size_bits
        if used + cost > budget:
            break  # the Lagrangian optimum for the budget used so far
        choice[i] = b
        used += cost
    if fill:
        _fill(candidates, n_weights, choice, budget - used)
    return _plan(candidates, n_weights, choice)


def _fill(candidates: Sequence[Sequence[Candidate]], n_weights: Sequence[int],
          choice: list[int], slack: int) -> None:
    """Spend ``slack`` bits: repeatedly the single-tensor change that fits and removes the
    most error per bit spent (a change that saves bits and error is taken first)."""
    while True:
        best: tuple[float, int, int] | None = None
        for i, cands in enumerate(candidates):
            cur = cands[choice[i]]
            for j, c in enumerate(cands):
                gain = n_weights[i] * (cur.rel_error - c.rel_error)
                cost = c.size_bits - cur.size_bits
                if gain <= 0 or cost > slack:
                    continue
                key = math.inf if cost <= 0 else gain / cost
                if best is None or key > best[0]:
                    best = (key, i, j)
        if best is None:
            return
        _, i, j = best
        slack -= candidates[i][j].size_bits - candidates[i][choice[i]].size_bits
        choice[i] = j


def sqnr_db(rel_error: float) -> float:
    """SQNR in dB of a relative squared error (inf for an exact candidate)."""
    return math.inf if rel_error <= 0 else -10.0 * math.log10(rel_error)


def target_sqnr(candidates: Sequence[Sequence[Candidate]], n_weights: Sequence[int],
                db: float) -> Plan:
    """The dual: per tensor the cheapest candidate with SQNR >= ``db``.

    A tensor that no candidate brings to ``db`` gets its most accurate one (the smallest
    among equals) and is flagged in ``Plan.short``, so the caller can say so. Independent
    per tensor, so the plan is the fewest bits in total that meets the target everywhere.
    """
    _check(candidates, n_weights)
    limit = 10.0 ** (-db / 10.0)
    choice, short = [], []
    for cands in candidates:
        ok = [j for j, c in enumerate(cands) if c.rel_error <= limit]
        if ok:
            choice.append(min(ok, key=lambda j: (cands[j].size_bits, cands[j].rel_error, j)))
            short.append(False)
        else:
            choice.append(min(range(len(cands)),
                              key=lambda j: (cands[j].rel_error, cands[j].size_bits, j)))
            short.append(True)
    return _plan(candidates, n_weights, choice, tuple(short))
