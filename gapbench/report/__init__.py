"""Tables (and, later, figures) made from run outputs."""

from .tables import gap_table_markdown

__all__ = ["gap_table_markdown"]
