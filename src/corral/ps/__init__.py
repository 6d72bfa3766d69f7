"""The parameter server: key-range shards, server-side optimizers, consistency models."""
