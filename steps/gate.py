"""The promotion gate: a pure decision, with its reasons, on numbers measured the same way.

    promotion_decision(tuned_upper=9.9, base=13.7, champion=None, min_improvement=0.0)

No I/O here: steps/register.py gathers the numbers (the champion re-scored when needed) and moves
the alias; this module only decides, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


def promotion_decision(
    tuned_upper: float,
    base: float,
    champion: float | None,
    min_improvement: float,
    forgetting: float | None = None,
    max_forgetting: float = float("inf"),
) -> Decision:
    """Promote only if the upper end of the tuned model's 95% interval is below the base model's
    and the champion's perplexity by the relative margin `min_improvement`, and its perplexity on
    general reference text rose by no more than `max_forgetting` (relative)."""
    reasons, promote = [], True
    if forgetting is not None:
        if forgetting <= max_forgetting:
            reasons.append(f"reference perplexity {forgetting:+.1%} (limit +{max_forgetting:.0%})")
        else:
            promote = False
            reasons.append(
                f"forgets too much: reference perplexity {forgetting:+.1%} > +{max_forgetting:.0%}"
            )
    for label, ref in (("base model", base), ("champion", champion)):
        if ref is None:
            reasons.append(f"no current {label}")
            continue
        bar = ref * (1 - min_improvement)
        if tuned_upper < bar:
            reasons.append(f"beats the {label}: upper bound {tuned_upper:.3f} < {bar:.3f}")
        else:
            promote = False
            reasons.append(f"does not beat the {label}: upper bound {tuned_upper:.3f} >= {bar:.3f}")
    return Decision(promote, reasons)
