"""Gateway service: the public API, routing writes to shards and fanning searches out to all of them."""
