"""Thin routers: parse, call one service method, pick JSON or SSE."""
