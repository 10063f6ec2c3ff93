"""Orchestration: the guard and the request path."""
