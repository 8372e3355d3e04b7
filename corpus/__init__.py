"""Readers, a dataset registry, splits, packing into token blocks and mixtures."""
