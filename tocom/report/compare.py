"""Declared comparisons between configurations, run on prediction records, and their Markdown table.

A comparison names two configuration filters, ``a`` and ``b`` (see :func:`tocom.report.records.matches`),
for example ``{"target": 16, "plugin": None}`` against ``{"target": 16, "plugin": "standard"}``.
Within each image set, the configurations that ``a`` selects are paired with those ``b`` selects
by the ``pair_on`` keys (by default task and seed): every pair is one run of the paired bootstrap,
so seed 0 without the plugin is compared with seed 0 with it. One configuration may pair with
several on the other side (one model, two plugin seeds); several with several is ambiguous and
refused. Each image set is one stratum of :func:`tocom.report.stats.pooled_difference`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tocom.report.records import Records
from tocom.report.stats import RESAMPLES, PairedDifference, pooled_difference

PAIR_ON = ("task", "seed")


@dataclass(frozen=True)
class Comparison:
    """A named question: how much better is configuration ``b`` than ``a``?"""

    name: str
    a: dict
    b: dict
    pair_on: tuple[str, ...] = PAIR_ON

    @classmethod
    def from_dict(cls, entry: Mapping) -> Comparison:
        """From a results JSON's ``comparisons`` entry: ``{"name", "a", "b"[, "pair_on"]}``."""
        missing = [k for k in ("name", "a", "b") if k not in entry]
        if missing or not isinstance(entry.get("a"), dict) or not isinstance(entry.get("b"), dict):
            raise ValueError(f"comparison {dict(entry)} needs a 'name' and filter objects 'a' and 'b' "
                             f"(missing: {missing or 'none'})")
        return cls(str(entry["name"]), dict(entry["a"]), dict(entry["b"]),
                   tuple(entry.get("pair_on", PAIR_ON)))


@dataclass(frozen=True)
class ComparisonResult:
    comparison: Comparison
    stats: PairedDifference
    runs: tuple[str, ...]  # one label per McNemar test, e.g. "task=cifar10 seed=0"


def group_by_images(records: Sequence[Records]) -> list[Records]:
    """Merge record sets that cover the same images (so configurations from different files can pair)."""
    groups: list[Records] = []
    for r in records:
        for i, g in enumerate(groups):
            if np.array_equal(g.index, r.index) and np.array_equal(g.label, r.label):
                groups[i] = g.merge(r)
                break
        else:
            groups.append(r)
    return groups


def _describe(where: Mapping) -> str:
    return " ".join(f"{k}={v}" for k, v in where.items()) or "(all)"


def pair_rows(records: Records, comparison: Comparison) -> list[tuple[int, int, str]]:
    """``(row_a, row_b, run label)`` for every run of ``comparison`` in one image set."""
    rows_a, rows_b = records.find(comparison.a), records.find(comparison.b)
    both = set(rows_a) & set(rows_b)
    if both:
        raise ValueError(f"{records.source}: {records.configs[min(both)]} matches both a and b of "
                         f"'{comparison.name}'; make the filters exclusive")
    key = lambda row: tuple(records.configs[row].get(k) for k in comparison.pair_on)
    side_a: dict[tuple, list[int]] = {}
    side_b: dict[tuple, list[int]] = {}
    for rows, side in ((rows_a, side_a), (rows_b, side_b)):
        for row in rows:
            side.setdefault(key(row), []).append(row)
    pairs = []
    for k in sorted(side_a.keys() | side_b.keys(), key=repr):
        label = _describe(dict(zip(comparison.pair_on, k)))
        ra, rb = side_a.get(k, []), side_b.get(k, [])
        if not ra or not rb:
            lacking = "a" if not ra else "b"
            raise ValueError(f"{records.source}: '{comparison.name}' has runs with {label} for "
                             f"{'b' if lacking == 'a' else 'a'} but none for {lacking}; every run needs "
                             "its counterpart on the same images (or narrow the filters)")
        if len(ra) > 1 and len(rb) > 1:
            raise ValueError(f"{records.source}: '{comparison.name}' matches {len(ra)} configurations for a "
                             f"and {len(rb)} for b with {label}; add a key to the filters or to pair_on")
        pairs += [(i, j, label) for i in ra for j in rb]
    return pairs


def compare(
    records: Sequence[Records], comparison: Comparison, *, n_resamples: int = RESAMPLES, seed: int = 0
) -> ComparisonResult:
    """Accuracies, paired difference ``b - a`` with its bootstrap CI, McNemar per run, over all image sets."""
    strata, runs = [], []
    for group in group_by_images(records):
        pairs = pair_rows(group, comparison)
        if pairs:
            strata.append((group.correct([i for i, _, _ in pairs]), group.correct([j for _, j, _ in pairs])))
            runs += [label for _, _, label in pairs]
    if not strata:
        names = ", ".join(r.source for r in records)
        raise ValueError(f"'{comparison.name}': no configuration in {names} matches a={comparison.a} "
                         f"and b={comparison.b}")
    stats = pooled_difference(strata, n_resamples=n_resamples, seed=seed)
    return ComparisonResult(comparison, stats, tuple(runs))


def _points(x: float, signed: bool = False, digits: int = 1) -> str:
    return f"{100 * x:+.{digits}f}" if signed else f"{100 * x:.{digits}f}"


def _p_values(ps: Sequence[float]) -> str:
    if len(ps) <= 4:
        return ", ".join(f"{p:.2g}" for p in ps)
    below = sum(p < 0.05 for p in ps)
    return f"{min(ps):.2g} to {max(ps):.2g} ({below} of {len(ps)} < 0.05)"


def comparison_table(rows: Sequence[tuple[str, PairedDifference]] | Sequence[ComparisonResult]) -> str:
    """Markdown table: accuracies (%), difference B - A in points with its CI, McNemar p per run.

    ``rows`` are ``(name, PairedDifference)`` pairs or :class:`ComparisonResult`s.
    """
    if not rows:
        return "(no comparisons)"
    rows = [(r.comparison.name, r.stats) if isinstance(r, ComparisonResult) else r for r in rows]
    level = {round(100 * s.confidence) for _, s in rows}
    ci = f"{level.pop()}% CI" if len(level) == 1 else "CI"
    header = ["comparison", "A (%)", "B (%)", f"B - A (points) [{ci}]", "McNemar p", "images", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for name, s in rows:
        diff = (f"{_points(s.difference, True, 2)} [{_points(s.ci_low, True, 2)}, "
                f"{_points(s.ci_high, True, 2)}]")
        cells = [name, _points(s.accuracy_a), _points(s.accuracy_b), diff, _p_values(s.mcnemar_p),
                 str(s.n_images), str(s.n_seeds)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
