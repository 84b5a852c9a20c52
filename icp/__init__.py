"""icp: an experiment framework for IC-Portrait (arXiv 2501.17159)."""

__version__ = "0.1.0"
