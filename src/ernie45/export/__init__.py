"""Ahead-of-time exports for runtimes without Python (`ernie45 export --format aoti`, see docs/cpp.md)."""
