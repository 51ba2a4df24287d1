"""Benchmarks against peers (not timed tests): each prints a table."""
