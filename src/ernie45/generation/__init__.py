"""Text generation: transformers-compatible `generate`, a per-step iterator, text streaming and samplers."""

from ernie45.generation.config import GenerationConfig
from ernie45.generation.generate import (
    GenerationChunk,
    Step,
    decode_step,
    generate,
    generate_step,
    resolve_config,
    stream_generate,
)
from ernie45.generation.prompt_cache import PromptCache
from ernie45.generation.sampling import make_processors, make_sampler, make_warpers
from ernie45.generation.speculative import Speculative
from ernie45.generation.streaming import (
    IncrementalDetokenizer,
    StopStringFilter,
    TextIteratorStreamer,
    TextStreamer,
)

__all__ = [
    "GenerationChunk",
    "GenerationConfig",
    "IncrementalDetokenizer",
    "PromptCache",
    "Speculative",
    "Step",
    "StopStringFilter",
    "TextIteratorStreamer",
    "TextStreamer",
    "decode_step",
    "generate",
    "generate_step",
    "make_processors",
    "make_sampler",
    "make_warpers",
    "resolve_config",
    "stream_generate",
]
