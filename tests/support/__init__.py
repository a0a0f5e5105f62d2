"""Reusable test servers: an OpenAI-compatible mock upstream and the proxy under uvicorn."""
