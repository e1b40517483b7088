"""Unlearning methods, one file each, sharing loss helpers in `losses`."""
