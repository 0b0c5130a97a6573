"""Detectors: what decides whether a generated image shows a concept. One file per detector, registered in the
registry of `base.py` (the toy world's own detector lives with the toy world, methods/toyworld)."""
