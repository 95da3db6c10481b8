"""Vectors -> scores, calibrated decisions and drift alarms. Pure Python and NumPy."""
