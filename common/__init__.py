"""Helpers shared by every stage: atomic output, manifests, errors and the dataclass CLI.

Stages import from here; nothing here imports a stage.
"""
