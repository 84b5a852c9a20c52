"""icp: an experiment framework for IC-Portrait (arXiv 2501.17159)."""

__version__ = "0.1.0"

# Loaded on first use: `import icp` (every CLI start) must not pay for torch and diffusers.
_LAZY = {"ICPortraitPipeline": "icp.pipeline"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'icp' has no attribute '{name}'")
