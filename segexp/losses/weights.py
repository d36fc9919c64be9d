"""Loss-term weights come from config only: the method's (or loss's) YAML is their one home, each
value written there with its source. A method states which terms it computes; a weight for a term it
does not compute (a typo) or a term without a weight is an error naming the config key, never a
silent default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from segexp.utils.errors import UserError

__all__ = ["term_weights", "WeightsError"]


class WeightsError(UserError, ValueError):
    """A config mistake in loss-term weights: printed in one line by the entry points."""


def term_weights(
    weights: Mapping[str, float] | None, terms: Sequence[str], key: str = "method.weights"
) -> dict[str, float]:
    """``{term: float weight}`` for exactly ``terms``, in that order."""
    given = dict(weights or {})
    unknown = sorted(set(given) - set(terms))
    if unknown:
        raise WeightsError(f"{key}: unknown term(s) {unknown}; this method's terms: {list(terms)}")
    missing = [t for t in terms if t not in given]
    if missing:
        raise WeightsError(f"{key}: no weight for {missing}; set every term's weight in the config (conf/)")
    return {t: float(given[t]) for t in terms}
