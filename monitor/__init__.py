"""Watching the served model: regression runs through the live router, their decisions and actions."""
