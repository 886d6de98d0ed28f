"""Flax linen modules, one concept a file. No I/O, no globals; every parameter carries logical axis names."""
