"""Tables (and, later, figures) made from run outputs."""

from gapbench.report.tables import (cross_family_csv, cross_family_latex, cross_family_markdown, cross_family_rows,
    gap_table_markdown)

__all__ = ["cross_family_csv", "cross_family_latex", "cross_family_markdown", "cross_family_rows",
           "gap_table_markdown"]
