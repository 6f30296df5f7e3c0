"""robustpatch: robust weight signatures."""
