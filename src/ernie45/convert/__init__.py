"""Checkpoint tools: Paddle ⇄ Hugging Face conversion (`paddle`), GGUF export (`gguf_export`), re-sharding
(`split`), all streamed tensor by tensor (`safetensors_io`) and published with SHA-256 manifests (`manifest`).
"""
