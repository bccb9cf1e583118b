"""Smoke tests of the benchmarks: their core functions on tiny inputs."""
