"""The promotion gate: a pure decision, with its reasons, on numbers measured the same way.

    promotion_decision(tuned_upper=9.9, base=13.7, champion=None, min_improvement=0.0)

No I/O here: steps/register.py gathers the numbers (the champion re-scored when it was measured
another way, in bits per byte when its tokenizer differs); this module only decides, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reference:
    """A model to beat, in a unit both models were measured in the same way.

    Perplexities of models with different tokenizers count different tokens and cannot be
    compared; bits per byte of the same texts can. `tuned_upper` is the candidate's upper bound in
    that unit; `note` says where the reference's number came from."""

    value: float
    tuned_upper: float
    unit: str = "perplexity"
    note: str = ""


def promotion_decision(
    tuned_upper: float,
    base: float,
    champion: float | Reference | None,
    min_improvement: float,
    forgetting: float | None = None,
    max_forgetting: float = float("inf"),
) -> Decision:
    """Promote only if the upper end of the tuned model's 95% interval is below the base model's
    and the champion's perplexity (or bits per byte, across tokenizers) by the relative margin
    `min_improvement`, and its perplexity on general reference text rose by no more than
    `max_forgetting` (relative)."""
    reasons, promote = [], True
    if forgetting is not None:
        if forgetting <= max_forgetting:
            reasons.append(f"reference perplexity {forgetting:+.1%} (limit +{max_forgetting:.0%})")
        else:
            promote = False
            reasons.append(
                f"forgets too much: reference perplexity {forgetting:+.1%} > +{max_forgetting:.0%}"
            )
    if isinstance(champion, int | float):
        champion = Reference(champion, tuned_upper)
    for label, ref in (("base model", Reference(base, tuned_upper)), ("champion", champion)):
        if ref is None:
            reasons.append(f"no current {label}")
            continue
        unit = "" if ref.unit == "perplexity" else f" in {ref.unit}"
        note = f" ({ref.note})" if ref.note else ""
        bar, upper = ref.value * (1 - min_improvement), ref.tuned_upper
        if upper < bar:
            reasons.append(f"beats the {label}{unit}: upper bound {upper:.3f} < {bar:.3f}{note}")
        else:
            promote = False
            reasons.append(
                f"does not beat the {label}{unit}: upper bound {upper:.3f} >= {bar:.3f}{note}"
            )
    return Decision(promote, reasons)
