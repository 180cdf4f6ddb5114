"""The OpenAI-compatible server: `api_server` (routes, uvicorn), `protocol` (pydantic bodies),
`serving_*` (one handler class per endpoint family)."""
