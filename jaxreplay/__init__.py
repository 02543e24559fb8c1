"""jaxreplay: scaling sweeps that measure and prevent forgetting in language models."""

__version__ = "0.1.0"
