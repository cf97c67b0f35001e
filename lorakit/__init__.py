"""lorakit: merge PEFT LoRA adapters from declarative YAML manifests."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorakit")
except PackageNotFoundError:  # running from a checkout that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
