"""Grow embed_tokens and lm_head of a checkpoint, shard by shard, with mean-of-subtoken rows."""
