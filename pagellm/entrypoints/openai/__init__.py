"""OpenAI-compatible HTTP API: `build_app` for the FastAPI app, `run_server` for `pagellm serve`."""
