"""edgecli: train -> compress -> export -> bench -> infer, for models that must run on edge devices."""

__version__ = "0.1.0"
