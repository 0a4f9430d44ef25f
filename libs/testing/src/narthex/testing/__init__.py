"""What tests, end-to-end runs and benchmarks share: processes, scenarios, Redis, a clock."""
