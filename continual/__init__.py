"""QLoRA continued pretraining of Mixtral with trainable embeddings, and a shard-by-shard merge."""
