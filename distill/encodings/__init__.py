"""How a teacher store's shards hold the targets (``distill cache-teacher --encoding``): one kind per file,
registered in :data:`distill.encodings.registry.ENCODINGS`."""
