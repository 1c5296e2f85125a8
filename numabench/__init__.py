"""numabench: run many pinned, NUMA-local instances of a BERT-like model and measure them."""

__version__ = "0.1.0"
