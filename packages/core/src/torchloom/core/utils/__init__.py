"""Small helpers shared by the core and both products."""
