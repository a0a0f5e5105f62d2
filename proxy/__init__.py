"""satroute proxy: an OpenAI-compatible HTTP service that routes each chat request with Model-SAT."""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("satroute")
except _metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0.0.0+source"
