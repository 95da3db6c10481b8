"""Event -> vector: one encoder per event kind. Pure Python and NumPy (and torch for text)."""
