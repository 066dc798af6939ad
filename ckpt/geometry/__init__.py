"""Box and byte-range geometry: regions of N-d tensors, row-major byte runs, coverage. Pure (no I/O)."""
