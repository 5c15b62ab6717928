"""The package version, read once from the installed distribution (``pyproject.toml`` declares it)."""
from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("gift-quant")
except PackageNotFoundError:  # a source tree on sys.path without an install
    VERSION = "0+unknown"
