"""OpenAI-compatible server over the engine: ``pagoda serve MODEL`` (see api.py)."""
