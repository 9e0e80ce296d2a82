"""PromQL pieces shared by the rule renderers (`alert_rules.py`, `trace_alerts.py`)."""

from __future__ import annotations

# The `alert_source` label of every rendered alert: it came from the exporter's config.
ALERT_SOURCE = "config"


def promql_string(value: str) -> str:
    """`value` as a double-quoted PromQL string literal (Go escaping; unicode kept as is)."""
    out = []
    for char in value:
        if char in ('"', "\\"):
            out.append("\\" + char)
        elif char in "\n\t\r":
            out.append({"\n": "\\n", "\t": "\\t", "\r": "\\r"}[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # A raw control character would end or corrupt the literal.
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def number(value: float) -> str:
    """A float as PromQL and people write it: 0.7, 2, 1e-05."""
    text = repr(float(value))
    return text.removesuffix(".0")


def selector(metric: str, *matchers: tuple[str, str, str]) -> str:
    """`metric{label op "value", ...}` with every value quoted safely."""
    inner = ", ".join(f"{label}{op}{promql_string(value)}" for label, op, value in matchers)
    return f"{metric}{{{inner}}}"


def any_of(patterns: list[str]) -> str:
    """One RE2 alternation of whole-name patterns; Prometheus anchors it as ^(?:...)$."""
    if len(patterns) == 1:
        return patterns[0]
    return "|".join(f"(?:{p})" for p in patterns)
