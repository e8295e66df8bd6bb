"""Shipped calibration mixes, prompt specs and offline corpora (data only; see foundation.package_data)."""
