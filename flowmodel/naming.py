"""Names shared by every layer (a leaf module: no flowmodel imports)."""

from __future__ import annotations

__all__ = ["is_cdr_source", "quantile_name"]


def quantile_name(q: float) -> str:
    """Variable name of quantile ``q``: 0.05 -> ``q05``, 0.5 -> ``q50``, 0.025 -> ``q02_5``.

    Whole percentages give two digits; a fractional part follows an underscore,
    so 0.025 (``q02_5``) never collides with 0.25 (``q25``).
    """
    pct = q * 100
    if abs(pct - round(pct)) < 1e-9:
        return f"q{round(pct):02d}"
    whole, frac = f"{pct:.6g}".split(".")
    return f"q{int(whole):02d}_{frac}"


def is_cdr_source(source: str) -> bool:
    """Whether a source name is a phone-data (CDR) source: ``cdr`` or ``cdr_<name>``.

    The one naming rule every layer uses (the fusion model's default observation
    model, the report's coverage, the pipeline's reference source).
    """
    return source == "cdr" or source.startswith("cdr_")
