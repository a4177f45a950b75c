"""LoRA settings from plain dicts (``finetune(adapter={...}, train_config={...})``, saved configs): each key must
be a field of the settings dataclass; an unknown one (a typo would otherwise be dropped silently and the run
would use the default) is an error naming it and the closest known field."""

from __future__ import annotations

import difflib
from dataclasses import fields


def from_dict(cls, d: dict, what: str, error: type[Exception]):
    """``cls(**d)``, refusing keys that are not fields of the dataclass ``cls`` with ``error`` ("unknown
    ``what`` setting ..."). ``d`` may be any mapping."""
    names = [f.name for f in fields(cls) if not f.name.startswith("_")]
    unknown = [k for k in d if k not in names]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), names, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise error(f"unknown {what} setting{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                    f"the {what} settings are {', '.join(names)}")
    return cls(**dict(d))


__all__ = ["from_dict"]
