"""Public data sets (checksummed downloads, or a local mirror at ``STFM_DATA_DIR``) and a synthetic cohort."""

from ._her2st import her2st, her2st_sections
from ._synthetic import synthetic_st

__all__ = ["her2st", "her2st_sections", "synthetic_st"]
