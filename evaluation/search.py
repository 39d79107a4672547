"""ELEVATER's coarse-to-fine search over a log-spaced weight-decay grid, shared by both linear-probe protocols.

The grid is `logspace(-6, 6, 97)`. The search scores the 7 points of `logspace(-6, 6, 7)` (every 16th grid
point), then, around the best point so far, the points 8, 4, 2 and 1 grid steps to its left and right. A
point replaces the peak only when it scores strictly higher, so ties keep the earlier point; before any point
scores above 0 the peak is index -1, and the spans are taken around it as ELEVATER's Python does.

Several searches (ELEVATER runs one per learning rate) advance together round by round, so a caller can train
every point of a round in one batch of heads.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np

GRID_POINTS = 97
COARSE_POINTS = 7
SPANS = (8, 4, 2, 1)


class WeightDecaySearch:
    """The state of one coarse-to-fine search over `grid`: every score seen, and the peak."""

    def __init__(self, log_low: float = -6, log_high: float = 6, points: int = GRID_POINTS,
                 coarse_points: int = COARSE_POINTS):
        self.grid = np.logspace(log_low, log_high, points).tolist()
        coarse = set(np.logspace(log_low, log_high, coarse_points).tolist())
        self.coarse = [i for i, value in enumerate(self.grid) if value in coarse]
        if len(self.coarse) != coarse_points:
            raise ValueError(f'a grid of {points} points does not contain the {coarse_points} coarse points')
        self.peak_index, self.peak_score = -1, 0.0
        self.scores: Dict[int, float] = {}

    def _candidates(self, span: int) -> List[int]:
        left = max(self.peak_index - span, 0)
        right = min(self.peak_index + span, len(self.grid) - 1)
        return [i for i in (left, right) if i != self.peak_index]

    def _take(self, indices: Sequence[int], scores: Sequence[float]) -> None:
        for index, score in zip(indices, scores):
            self.scores[index] = score
            if score > self.peak_score:
                self.peak_index, self.peak_score = index, score

    @property
    def best(self) -> Tuple[float, float]:
        return self.grid[self.peak_index], self.peak_score


def search_together(searches: Sequence[WeightDecaySearch],
                    score: Callable[[List[Tuple[int, int]]], List[float]]) -> None:
    """Advance several searches round by round; `score` gets (search number, grid index) pairs of one round
    and returns their scores. A pair scored before is not scored again (the scores are deterministic)."""
    rounds: List[Callable[[WeightDecaySearch], List[int]]] = [lambda s: s.coarse]
    rounds += [lambda s, span=span: s._candidates(span) for span in SPANS]
    for candidates in rounds:
        indices = [candidates(s) for s in searches]  # all taken around the peaks before this round
        fresh = list(dict.fromkeys((n, i) for n, s in enumerate(searches) for i in indices[n] if i not in s.scores))
        new_scores = dict(zip(fresh, score(fresh))) if fresh else {}
        for n, search in enumerate(searches):
            search._take(indices[n], [new_scores[(n, i)] if (n, i) in new_scores else search.scores[i]
                                      for i in indices[n]])
