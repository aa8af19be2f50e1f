"""Public data sets: checksummed downloads, or a local mirror at ``STFM_DATA_DIR``."""

from ._her2st import her2st, her2st_sections

__all__ = ["her2st", "her2st_sections"]
