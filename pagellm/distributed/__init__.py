"""Parallel layout (which rank holds what) and the collectives layers use (see communication.py)."""
