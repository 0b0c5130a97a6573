"""Defender candidates as a defense reads them back: the outcome of each candidate (its worst case over its
attacks, its retention after erasure), the Pareto front of the feasible ones, and their printed summary.
Light on purpose: the report reads them without the machinery that ran the search (orchestrator/sweep.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.formatting import finite, fmt


@dataclass(frozen=True)
class Candidate:
    """A defender candidate run of a defense: its values and its outcome over the attacker's trials."""

    number: int
    run_id: str
    params: dict[str, Any]  # dotted spec path (erase.config...) -> value (as text when read from MLflow)
    worst: float  # the worst case over its attacks (`score`); lower is better for the defender; nan when not logged
    retention: float  # higher is better; nan when not logged
    feasible: bool
    status: str
    score: str = "presence"  # what `worst` is: the worst presence or the worst resurgence (defender.score)
    utility: str = "retention"  # what `retention` is: retention or the CLIP score after erasure (defender.utility)


def pareto_front(candidates: Sequence[Candidate]) -> list[Candidate]:
    """The feasible candidates no other feasible one beats on both objectives (worst case lower,
    retention higher), by worst case ascending. Infeasible ones do not compete: the defense rejects them."""
    pool = [c for c in candidates if c.feasible and finite(c.worst) and finite(c.retention)]

    def beaten(c: Candidate) -> bool:
        return any(
            o.worst <= c.worst and o.retention >= c.retention and (o.worst < c.worst or o.retention > c.retention)
            for o in pool
        )

    return sorted((c for c in pool if not beaten(c)), key=lambda c: (c.worst, -c.retention))


def best_candidate(candidates: Sequence[Candidate]) -> Candidate | None:
    """The feasible candidate with the lowest worst case (ties: the higher retention)."""
    front = pareto_front(candidates)
    return front[0] if front else None


def best_line(candidates: Sequence[Candidate]) -> str:
    best = best_candidate(candidates)
    if best is None:
        return "no feasible candidate yet"
    return (
        f"best: candidate {best.number} worst-case {best.score} {best.worst:.3f}, {best.utility} {best.retention:.3f}"
    )


def print_candidates(candidates: Sequence[Candidate], objective: str) -> None:
    front = {c.number for c in pareto_front(candidates)}
    print(f"\nDefender candidates ({objective}; * = on the Pareto front of the feasible ones):")
    for c in sorted(candidates, key=lambda c: (not c.feasible, c.worst)):
        params = ", ".join(f"{p}={fmt(v)}" for p, v in c.params.items())
        mark = "*" if c.number in front else " "
        print(
            f" {mark} candidate {c.number}: worst {c.score} {fmt(c.worst)}, {c.utility} "
            f"{fmt(c.retention)}{'' if c.feasible else ' (below the retention floor)'}  [{params}]"
        )
    print(best_line(candidates))
