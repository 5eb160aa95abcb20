"""Prometheus text-format metrics, without a client library: counters, gauges read at scrape
time, and cumulative histograms."""

from __future__ import annotations

import threading
from typing import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in sorted(labels.items()))
    return "{" + inner + "}"


class Metrics:
    def __init__(self, prefix: str = "ownlm"):
        self.prefix = prefix
        self.lock = threading.Lock()
        self.counters: dict[str, dict[tuple, float]] = {}
        self.help: dict[str, tuple[str, str]] = {}
        self.hists: dict[str, dict[tuple, list[float]]] = {}
        self.gauges: dict[str, Callable[[], dict[tuple, float]]] = {}

    def counter(self, name: str, help_: str) -> None:
        self.help[name] = ("counter", help_)
        self.counters[name] = {}

    def histogram(self, name: str, help_: str) -> None:
        self.help[name] = ("histogram", help_)
        self.hists[name] = {}

    def gauge(self, name: str, help_: str, read: Callable[[], dict[tuple, float]], kind: str = "gauge") -> None:
        """`read` returns {label items: value} at scrape time (kind "counter": a total kept elsewhere)."""
        self.help[name] = (kind, help_)
        self.gauges[name] = read

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            self.counters[name][key] = self.counters[name].get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self.lock:
            h = self.hists[name].setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            for i, bound in enumerate(LATENCY_BUCKETS):
                if value <= bound:
                    h[i] += 1
            h[-2] += 1  # count (the +Inf bucket)
            h[-1] += value  # sum

    def render(self) -> str:
        out: list[str] = []
        with self.lock:
            for name, (kind, help_) in self.help.items():
                full = f"{self.prefix}_{name}"
                out += [f"# HELP {full} {help_}", f"# TYPE {full} {kind}"]
                if name in self.gauges:
                    for key, v in self.gauges[name]().items():
                        out.append(f"{full}{_labels(dict(key))} {v:g}")
                elif kind == "counter":
                    for key, v in self.counters[name].items():
                        out.append(f"{full}{_labels(dict(key))} {v:g}")
                elif kind == "gauge":
                    for key, v in self.gauges[name]().items():
                        out.append(f"{full}{_labels(dict(key))} {v:g}")
                else:
                    for key, h in self.hists[name].items():
                        labels = dict(key)
                        for i, bound in enumerate(LATENCY_BUCKETS):
                            out.append(f"{full}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {h[i]:g}")
                        out.append(f"{full}_bucket{_labels({**labels, 'le': '+Inf'})} {h[-2]:g}")
                        out.append(f"{full}_count{_labels(labels)} {h[-2]:g}")
                        out.append(f"{full}_sum{_labels(labels)} {h[-1]:g}")
        return "\n".join(out) + "\n"
