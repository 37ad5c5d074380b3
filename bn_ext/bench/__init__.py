"""Benchmarks of bn_ext against PyTorch's own BatchNorm: `python -m bn_ext.bench --help`."""
