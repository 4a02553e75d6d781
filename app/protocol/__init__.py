"""OpenAI wire models (pydantic only). Nothing here imports from ``deployments`` or any engine code."""
