"""Benchmarks for narthex: reverse-proxy pass-through measured against a bare aiohttp baseline."""
