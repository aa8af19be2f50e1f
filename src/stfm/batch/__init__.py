"""Batch runs over a cohort: ``stfm batch CONFIG`` on Dask distributed, one task per slide, resumable.

``import stfm.batch`` imports neither dask nor torch; they are imported when a batch runs.
"""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "BatchConfig": "_config",
        "BatchConfigError": "_config",
        "Slide": "_config",
        "load_config": "_config",
        "parse_config": "_config",
        "check_config": "_checks",
        "run_batch": "_engine",
        "local_cluster": "_engine",
        "run_slide": "_task",
        "compare_outputs": "_compare",
    },
)
