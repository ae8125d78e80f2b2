"""Tagger service: projection heads and the live, durable tag vocabulary."""
