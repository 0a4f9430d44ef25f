"""The `narthex` command line: `narthex up` runs the platform locally."""
