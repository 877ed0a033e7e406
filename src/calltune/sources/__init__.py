"""Dataset adapters: each reads one public layout (file or hub id) into canonical `Example`s.

Rows a source cannot use are counted in a `Rejects` and written to a rejects file with the reason.
"""

from calltune.sources.base import Rejects, SourceError, read_table

__all__ = ["Rejects", "SourceError", "read_table"]
