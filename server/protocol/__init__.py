"""OpenAI wire format: pydantic models only (no torch, no FastAPI)."""
