"""narthex.common: the code every narthex service shares, and nothing else."""
