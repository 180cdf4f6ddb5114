"""The OpenAI-compatible server: `api_server` routes each endpoint to its `serving_*` handler."""
