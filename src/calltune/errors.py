"""calltune's error types: every error that bad input or configuration can cause derives from
`CalltuneError`, so the command line (and Python callers) tell a user's mistake from a bug.

Each stage keeps its own subclass next to its code (`calltune.recipe.RecipeError`,
`calltune.sources.SourceError`, `calltune.formats.FormatError`, `calltune.schema.SchemaError`,
`calltune.models.ModelNotFound`, ...); this module holds only the root and the errors with no stage.
"""

from __future__ import annotations


class CalltuneError(ValueError):
    """Bad input or configuration. The message names the file, row, field or option, and what to do.

    A `ValueError` subclass, so code that caught `ValueError` before keeps working.
    """


class UsageError(CalltuneError):
    """A command-line option or API argument that is missing, malformed or contradicts another."""
