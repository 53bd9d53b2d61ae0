"""OpenAI-compatible serving: `server` (FastAPI app + `ernie45 serve`) with its parts `state`, `guard`,
`routes`, `streaming` and `follower`; `engine` (continuous batching) with `request` (its types), `scheduler`
and `sampler`; `protocol` (request/response bodies), `metrics` (Prometheus) and `loadtest`."""
