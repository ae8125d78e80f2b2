"""Training and evaluation of learned projection heads (torch lives here, never on the serving path)."""
