"""OpenAI-compatible serving: `server` (FastAPI app + `ernie45 serve`), `engine` (continuous batching),
`protocol` (request/response bodies), `metrics` (Prometheus) and `loadtest` (`ernie45 loadtest`)."""
