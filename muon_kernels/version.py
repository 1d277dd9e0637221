"""The package version (one place: muon_kernels/__init__.py re-exports it, cache_file keys on it);
pyproject.toml repeats it for the build."""

__version__ = "0.1.0"
