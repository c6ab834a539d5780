"""Samples, percentiles, the printed table and the JSON report."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear interpolation between closest ranks."""
    if not values:
        return math.nan
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": statistics.median(values) if values else math.nan,
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values) if values else math.nan,
        "max": max(values) if values else math.nan,
    }


@dataclass
class Figure:
    """One measured quantity (e.g. "RunPodSandbox ms") for every runtime, plus a floor."""

    group: str
    name: str
    unit: str = "ms"
    #: "lower" when less is better (latency, memory), "higher" for throughput.
    better: str = "lower"
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""

    def add(self, runtime: str, value: float) -> None:
        self.samples.setdefault(runtime, []).append(value)

    def to_json(self, reference: str) -> dict[str, Any]:
        out: dict[str, Any] = {
            "group": self.group, "name": self.name, "unit": self.unit, "better": self.better,
            "note": self.note,
            "runtimes": {rt: {**summary(v), "samples": v} for rt, v in self.samples.items()},
        }
        ratio = self.ratio(reference)
        if ratio is not None:
            out["ratio_moorage_over_" + reference] = ratio
        return out

    def ratio(self, reference: str) -> float | None:
        a, b = self.samples.get("moorage"), self.samples.get(reference)
        if not a or not b:
            return None
        ref = statistics.median(b)
        return statistics.median(a) / ref if ref else None


@dataclass
class Report:
    reference: str = "containerd"
    figures: dict[str, Figure] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def figure(self, group: str, name: str, unit: str = "ms", better: str = "lower",
               note: str = "") -> Figure:
        key = f"{group}/{name}"
        if key not in self.figures:
            self.figures[key] = Figure(group, name, unit, better, note=note)
        return self.figures[key]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "reference": self.reference,
                "figures": {k: f.to_json(self.reference) for k, f in self.figures.items()}}

    def table(self, runtimes: list[str]) -> str:
        cols = [rt for rt in runtimes if rt != "floor"]
        for f in self.figures.values():  # e.g. conmon in the memory figures
            cols += [k for k in f.samples if k not in cols and not k.startswith("floor")]
        has_floor = any("floor" in f.samples for f in self.figures.values())
        head = f"{'figure':<44}"
        for rt in cols:
            head += f" | {rt + ' p50/p90/p99':>27}"
        if has_floor:
            head += f" | {'runc floor p50':>14}"
        head += f" | {'ratio':>6}"
        lines = [head, "-" * len(head)]
        group = ""
        for f in self.figures.values():
            if f.group != group:
                group = f.group
                lines.append(f"[{group}]")
            row = f"  {f.name + ' (' + f.unit + ')':<42}"
            for rt in cols:
                v = f.samples.get(rt)
                if v:
                    s = summary(v)
                    row += f" | {_num(s['p50']):>8} {_num(s['p90']):>8} {_num(s['p99']):>9}"
                else:
                    row += f" | {'-':>27}"
            if has_floor:
                fl = f.samples.get("floor")
                row += f" | {_num(statistics.median(fl)) if fl else '-':>14}"
            r = f.ratio(self.reference)
            row += f" | {f'{r:.2f}' if r is not None else '-':>6}"
            lines.append(row)
        return "\n".join(lines)


def _num(v: float) -> str:
    if math.isnan(v):
        return "-"
    if abs(v) >= 1000:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"
