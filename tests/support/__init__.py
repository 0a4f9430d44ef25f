"""Shared test helpers: real local servers, process runners."""
