"""Which traces are kept: a rate by trace id, per-route rates, decided before any span exists."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["Sampler", "template_regex"]

_LOW_64 = (1 << 64) - 1
# {name}, {name:conv} (Starlette), <name>, <conv:name> (Flask, Django); {p:path} spans slashes.
_PARAM = re.compile(r"\{[^}:]+:path\}|\{[^}]+\}|<path:[^>]+>|<[^>]+>")


def template_regex(template: str) -> str:
    """A route template (any framework's syntax) as a regex over request paths."""
    out, last = [], 0
    for match in _PARAM.finditer(template):
        out.append(re.escape(template[last : match.start()]))
        out.append(".*" if "path" in match.group() else "[^/]+")
        last = match.end()
    out.append(re.escape(template[last:]))
    return "".join(out)


class Sampler:
    """Ratio sampling on the trace id's low 64 bits, as OpenTelemetry's TraceIdRatioBased does."""

    def __init__(self, rate: float, rules: Sequence[tuple[str, float]] = ()) -> None:
        self.rate = rate
        self._bound = _bound(rate)
        self._rules = [
            (re.compile(r[3:] if r.startswith("re:") else template_regex(r)), _bound(rate))
            for r, rate in rules
        ]
        # Every trace that starts here is kept (rate 1 and no lower rule).
        self.always_keeps = all(b > _LOW_64 for b in [self._bound, *(b for _, b in self._rules)])

    def keeps(self, trace_id: int, path: str) -> bool:
        """The decision for a trace that starts here (the first matching rule wins)."""
        bound = self._bound
        if not self._rules:
            return (trace_id & _LOW_64) < bound
        for pattern, rule_bound in self._rules:
            if pattern.fullmatch(path):
                bound = rule_bound
                break
        return (trace_id & _LOW_64) < bound


def _bound(rate: float) -> int:
    return round(rate * (_LOW_64 + 1))
