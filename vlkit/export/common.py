"""What both export formats share: the export.json version, the error, and whether every stage had finished."""
from __future__ import annotations

EXPORT_VERSION = 1


class ExportError(ValueError):
    """A run cannot be exported in the requested format; the message names the part and why."""


def complete(recipe, used: dict[str, str]) -> bool:
    """Every stage's weights came from its ``final`` checkpoint."""
    return all(used.get(s) == "final" for s in recipe.train.stages)
