"""flowmodel: migration flows with uncertainty from rasters, census and CDR."""

from flowmodel._version import __version__

__all__ = ["__version__"]
