"""Thin absl entry points: flags, distributed init, then one library call."""
