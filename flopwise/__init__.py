"""flopwise: train the best language model a fixed budget allows."""

__version__ = "0.1.0"
