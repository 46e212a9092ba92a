"""Curated experiments, applied with `trainctl run +recipe=NAME`."""
