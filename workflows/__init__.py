"""Staged, resumable runs from a TOML file; the `graft` CLI; the bundled demo."""
