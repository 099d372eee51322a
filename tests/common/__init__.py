"""Shared test helpers: a tiny real transformer and real text."""
