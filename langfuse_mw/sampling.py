"""Which traces are kept: a rate by trace id, per-route rates, decided before any span exists."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["Sampler", "TemplateMatcher", "template_regex"]

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


# Paths longer than this skip the regex rules (``re:`` and templates with a path parameter):
# the sampling decision must not cost more than the request, whatever the path.
MAX_REGEX_PATH = 1024


class TemplateMatcher:
    """Matches paths against a route template without backtracking.

    ``template_regex`` turns ``/v/{major}.{minor}.{patch}`` into a regex whose full match
    backtracks polynomially on ``/v/...............`` (seconds for a 2 kB path, on every request,
    before routing). Here each segment is matched left to right: the parameters between two
    literals take the text up to the literal's leftmost occurrence, which never loses a match
    because a parameter takes any non-empty text. Templates with a path parameter use the regex.
    """

    def __init__(self, template: str) -> None:
        self.segments = [_segment(part) for part in template.split("/")]

    def fullmatch(self, path: str) -> bool:
        """True if ``path`` matches the template (as ``re.fullmatch`` on its regex would)."""
        parts = path.split("/")
        if len(parts) != len(self.segments):
            return False
        pairs = zip(self.segments, parts, strict=True)
        return all(_segment_matches(segment, part) for segment, part in pairs)


def _segment(template: str) -> tuple[list[str], list[int]]:
    # Literals around the parameters, and how many parameters each gap holds (adjacent ones
    # are one gap: together they take at least one character each).
    literals: list[str] = [""]
    gaps: list[int] = []
    last = 0
    for match in _PARAM.finditer(template):
        text = template[last : match.start()]
        if text or not gaps:
            literals[-1] += text
            gaps.append(1)
            literals.append("")
        else:
            gaps[-1] += 1
        last = match.end()
    literals[-1] += template[last:]
    return literals, gaps


def _segment_matches(segment: tuple[list[str], list[int]], text: str) -> bool:
    literals, gaps = segment
    if not gaps:
        return text == literals[0]
    first, final = literals[0], literals[-1]
    if not (text.startswith(first) and text.endswith(final)):
        return False
    end = len(text) - len(final)
    pos = len(first)
    for literal, least in zip(literals[1:-1], gaps[:-1], strict=True):
        found = text.find(literal, pos + least, end)
        if found < 0:
            return False
        pos = found + len(literal)
    return end - pos >= gaps[-1]


class _RegexRule:
    # A regex rule (``re:`` or a template with a path parameter), skipped for long paths.
    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def fullmatch(self, path: str) -> bool:
        return len(path) <= MAX_REGEX_PATH and self.pattern.fullmatch(path) is not None


def _rule(rule: str) -> TemplateMatcher | _RegexRule:
    if rule.startswith("re:"):
        return _RegexRule(rule[3:])
    if any("path" in match.group() for match in _PARAM.finditer(rule)):
        return _RegexRule(template_regex(rule))
    return TemplateMatcher(rule)


class Sampler:
    """Ratio sampling on the trace id's low 64 bits, as OpenTelemetry's TraceIdRatioBased does."""

    def __init__(self, rate: float, rules: Sequence[tuple[str, float]] = ()) -> None:
        self.rate = rate
        self._bound = _bound(rate)
        self._rules = [(_rule(r), _bound(rate)) for r, rate in rules]
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
