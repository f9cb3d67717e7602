"""The installed saepipe's version, recorded in every export and activation DB. pyproject.toml is its one home;
this module sits at the bottom so that any layer can record it without importing the package's public face."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("saepipe")
except PackageNotFoundError:  # running from a source tree that was never installed
    VERSION = "0+unknown"
