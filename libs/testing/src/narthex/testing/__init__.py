"""What tests, end-to-end runs and benchmarks share: ports, processes, a driven clock."""
