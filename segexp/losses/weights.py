"""Loss-term weights come from config only: the method's (or loss's) YAML is their one home, each
value written there with its source. A method states which terms it computes; a weight for a term it
does not compute (a typo) or a term without a weight is an error naming the config key, never a
silent default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["term_weights"]


def term_weights(
    weights: Mapping[str, float] | None, terms: Sequence[str], key: str = "method.weights"
) -> dict[str, float]:
    """``{term: float weight}`` for exactly ``terms``, in that order."""
    given = dict(weights or {})
    unknown = sorted(set(given) - set(terms))
    if unknown:
        raise ValueError(f"{key}: unknown term(s) {unknown}; this method's terms: {list(terms)}")
    missing = [t for t in terms if t not in given]
    if missing:
        raise ValueError(f"{key}: no weight for {missing}; every term's weight is set in the config (conf/)")
    return {t: float(given[t]) for t in terms}
