"""Index service: one durable shard of image vectors (visual and semantic spaces) searched with FAISS."""
