"""edgecompact: hardware-aware compact architecture search and compilation for CNNs on edge devices."""

__version__ = "0.1.0"
