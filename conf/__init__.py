"""Hydra config groups shipped with trainctl (one YAML per option)."""
