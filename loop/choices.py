"""A value that must be one of a few named choices: a typo is an error naming them, with a "did you mean".

Why one home: `sortloop labels --label chiar` once printed "0 photo(s)" and exit 0; every option that takes
a class, flag, review status or source checks its value here, so the message reads the same everywhere.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from loop.errors import UnknownChoiceError


def check_choice(option: str, value: str, valid: Iterable[str]) -> str:
    """`value` if it is one of `valid`; else UnknownChoiceError naming the valid ones and the closest match.

    Example:
        >>> check_choice("--label", "chiar", ["chair", "table"])   # doctest: +SKIP
        UnknownChoiceError: --label: no such value 'chiar' (did you mean 'chair'?); valid: chair, table
    """
    choices = sorted(dict.fromkeys(str(v) for v in valid))
    if value in choices:
        return value
    close = difflib.get_close_matches(value, choices, n=1, cutoff=0.6) or difflib.get_close_matches(
        value.lower(), [c.lower() for c in choices], n=1, cutoff=0.6)
    hint = ""
    if close:
        match = next(c for c in choices if c.lower() == close[0].lower())
        hint = f" (did you mean {match!r}?)"
    shown = ", ".join(choices) if choices else "none yet"
    raise UnknownChoiceError(f"{option}: no such value {value!r}{hint}; valid: {shown}")
