"""Quantize a checkpoint tensor by tensor, straight from its files: memory bounded by the largest tensor.

`StreamQuantizer` reads one source tensor at a time from a `CheckpointReader` (positional reads, nothing
mapped), quantizes the weights of the Linears `quantize_model` would swap, and hands out the tensors of the
quantized checkpoint in file order. Its output is what `ernie45.load(dtype=...)` + `quantize_model` +
`save_checkpoint` write for the same dtype, bit for bit (same quantizers, same names, dtypes and order), without
ever building the float model:

    from ernie45.checkpoint_read import CheckpointReader
    from ernie45.config import ErnieConfig
    from ernie45.convert.safetensors_io import write_shards

    with CheckpointReader(src) as reader, StreamQuantizer(reader, ErnieConfig.from_pretrained(src), "wint4") as sq:
        write_shards(out_dir, sq.specs, sq.produce, "2GB")
        sq.config.save(out_dir)
    print(sq.report.summary())

(`ernie45 quantize` does this, atomically, with the tokenizer and a progress bar.)

Modes: wint8, wint4 and llm.int8 without calibration (calibration runs the model, nf4 needs bitsandbytes'
own packing of the whole model: both stay with `quantize_model`).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor, nn

from ernie45.errors import ErnieError
from ernie45.quant import (
    EMBED_TOKENS,
    LayerReport,
    QuantReport,
    _nbytes,
    prepare_for_load,
    quantization_config,
    quantize_embedding_module,
    quantize_linear,
    select_targets,
    validate_options,
)

STREAM_MODES = ("wint8", "wint4", "llm.int8")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDING = "model.embed_tokens.weight"

__all__ = ["STREAM_MODES", "StreamQuantizer", "resolve_checkpoint_dtype"]


def resolve_checkpoint_dtype(dtype: str | torch.dtype, config) -> torch.dtype:
    """`ernie45 quantize --dtype`: "auto" is the checkpoint's own dtype (config.json `torch_dtype`; float32 when it
    names none of float32 / bfloat16 / float16)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ErnieError(f"unsupported dtype {dtype}; use {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        return DTYPES.get(config.torch_dtype, torch.float32)
    if dtype not in DTYPES:
        raise ErnieError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class StreamQuantizer:
    """The tensors of the quantized checkpoint, computed one source tensor at a time.

    Args:
        reader: an open `ernie45.checkpoint_read.CheckpointReader` on the float checkpoint (kept open while in use).
        config: that checkpoint's `ErnieConfig` (not quantized).
        mode: "wint8", "wint4" or "llm.int8" (uncalibrated: outlier columns are found per batch at run time).
        group_size: wint4: 32, 64 or 128; None picks 128 when it divides every quantized width, else 64.
        quantize_lm_head: also quantize the output head; a head tied to the embeddings is quantized from
            `model.embed_tokens.weight` and the output config unties it (the embeddings stay float).
        quantize_embedding: also write the token embedding in int8, one scale per row (`Int8Embedding`:
            `model.embed_tokens.weight` int8 and `model.embed_tokens.weight_scale`); tied embeddings need
            `quantize_lm_head` (ErnieError otherwise), as for `quantize_model`.
        skip: Linear names or name suffixes to leave in float.
        dtype: dtype of everything left in float and of the scales (and what the weights are rounded to before
            quantizing, as `ernie45.load(dtype=...)` would): "auto" (the checkpoint's), "float32", "bfloat16",
            "float16" or a torch dtype.
        threshold: llm.int8 outlier threshold.
        prefetch: read and quantize the next tensors in two background threads while the caller consumes the
            current one (needs `close()`, or `with StreamQuantizer(...) as sq:`, to stop them on error).

    Attributes:
        config: the output `ErnieConfig` (`quantization_config` as `quantize_model` records it,
            `tie_word_embeddings`, `torch_dtype`), ready for `config.save(dir)`.
        quantization_config: that entry.
        dtype: the resolved float dtype.
        specs: the output `TensorSpec`s in file order (the order `save_checkpoint` writes; a tied head is
            omitted, as on disk).
        targets: {Linear name: (out_features, in_features)} of the Linears that are quantized.
        embedding: (vocab, hidden) of the token embedding when it is quantized, else None.
        source_params: {output tensor name: source parameters it accounts for} (a quantized weight counts its
            N x K float weights, scales count 0, a head quantized from tied embeddings 0), for progress
            reporting; they sum to `total_params`, the parameter count of the source checkpoint.

    `tensor(name)` / `produce(spec)` return one output tensor; the tensors of one quantized Linear are computed
    together and the siblings kept until asked for. Ask for them in `specs` order: then one module's output is
    held at a time (plus, with `prefetch`, the next unit being quantized and the one after it being read), and
    the prefetching pays off; any other order works, unprefetched. `report` is the `QuantReport` of the Linears
    done so far.
    """

    def __init__(
        self,
        reader,
        config,
        mode: str,
        *,
        group_size: int | None = None,
        quantize_lm_head: bool = False,
        quantize_embedding: bool = False,
        skip: Sequence[str] = (),
        dtype: str | torch.dtype = "auto",
        threshold: float = 6.0,
        prefetch: bool = True,
    ):
        from ernie45.checkpoint_read import build_model, plan_tensors
        from ernie45.convert.safetensors_io import TensorSpec

        validate_options(mode, 128 if group_size is None else group_size, threshold)
        if mode not in STREAM_MODES:
            raise ErnieError(
                f"mode {mode} is not quantized tensor by tensor (only {', '.join(STREAM_MODES)}); "
                "use ernie45.quant.quantize_model on a loaded model"
            )
        if config.quantization_config:
            raise ErnieError(
                f"{reader.path} is already quantized ({config.quantization_config.get('mode')}); "
                "quantize the original float checkpoint"
            )
        self.reader, self.mode, self.threshold = reader, mode, float(threshold)
        self.dtype = resolve_checkpoint_dtype(dtype, config)
        model = build_model(config, self.dtype, meta=True)
        # every tensor the float model would load, its dtype and shape; ErnieError naming each mismatch
        self._plan = plan_tensors(model, reader, config, self.dtype, reader.path)
        self._mtp_fix = self._carry_mtp(model, reader)
        not_convert, linears, group_size = select_targets(
            model, mode, group_size, quantize_lm_head, skip, quantize_embedding
        )
        self.group_size = group_size
        self._source_tied = bool(config.tie_word_embeddings)
        untie = quantize_lm_head and self._source_tied and "lm_head" in linears
        self.quantization_config = quantization_config(
            mode,
            not_convert,
            group_size=group_size,
            threshold=self.threshold,
            embedding="int8" if quantize_embedding else None,
        )
        self.config = config.replace(
            quantization_config=self.quantization_config,
            tie_word_embeddings=self._source_tied and not untie,
            torch_dtype=str(self.dtype).replace("torch.", ""),
        )
        self.targets = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
        self._has_bias = {name: lin.bias is not None for name, lin in linears.items()}
        self._order = {name: i for i, name in enumerate(linears)}
        emb = model.get_submodule(EMBED_TOKENS)
        self.embedding = (emb.num_embeddings, emb.embedding_dim) if quantize_embedding else None

        model.config = self.config  # untied where the head is quantized: what prepare_for_load checks
        prepare_for_load(model, self.quantization_config)  # quantized modules on meta: names, dtypes, shapes
        self.specs = []
        self.source_params: dict[str, int] = {}
        for name, ref in model.state_dict().items():
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # saved once, as the embeddings
            module, _, leaf = name.rpartition(".")
            if module in self.targets:
                spec = TensorSpec(name, ref.dtype, tuple(ref.shape))
                n, k = self.targets[module]
                counted = leaf == "weight" and not (module == "lm_head" and self._source_tied)
                self.source_params[name] = n * k if counted else n if leaf == "bias" else 0
            elif module == EMBED_TOKENS and self.embedding is not None:
                spec = TensorSpec(name, ref.dtype, tuple(ref.shape))
                self.source_params[name] = ref.numel() if leaf == "weight" else 0
            else:
                dt, shape = self._plan[name]
                spec = TensorSpec(name, dt, tuple(shape))
                self.source_params[name] = spec.nbytes // max(dt.itemsize, 1)
            self.specs.append(spec)
        self.total_params = sum(self.source_params.values())
        quantized = set(self.targets) | ({EMBED_TOKENS} if self.embedding is not None else set())
        self._unit_of = {
            s.name: s.name.rpartition(".")[0] if s.name.rpartition(".")[0] in quantized else s.name
            for s in self.specs
        }
        self._units = list(dict.fromkeys(self._unit_of.values()))  # in file order
        self._unit_index = {u: i for i, u in enumerate(self._units)}
        self.prefetch = prefetch
        self._pools: list[ThreadPoolExecutor] = []
        self._computing: dict[int, Future] = {}
        self._reading: dict[int, Future] = {}
        self._lock = threading.Lock()
        self._ready: dict[str, Tensor] = {}
        self._layers: dict[str, LayerReport] = {}
        self._bytes_before = self._bytes_after = 0
        self._embedding_report: LayerReport | None = None
        self._embedding_bytes = (0, 0)

    def _carry_mtp(self, model, reader) -> dict[str, str]:
        """Attach the MTP layer (`ernie45.mtp`, a draft head) the checkpoint holds and plan its float tensors, so
        its Linears are quantized with the others (`ernie45.quant.MTP_MODES`) and the rest is carried over; the
        reader then serves them like any other tensor. -> {name: "transpose"} of tensors stored transposed."""
        from ernie45.mtp import plan_mtp

        plan, fix = plan_mtp(model, reader.mtp_entries, self.dtype, reader.path)
        if plan:
            reader.keep_mtp()
            self._plan.update(plan)
        return fix

    def _source(self, name: str) -> Tensor:
        """Float source tensor `name` in its planned dtype, turned the right way where stored transposed."""
        t = self.reader.read(name, dtype=self._plan[name][0])
        return t.t().contiguous() if self._mtp_fix.get(name) == "transpose" else t

    # ---- output -------------------------------------------------------------------------------------
    # A unit is what one read produces: a quantized Linear (all its output tensors) or one float tensor.
    # With `prefetch`, while the caller writes unit i, one thread quantizes unit i + 1 and another reads
    # unit i + 2, so the disk, the quantizer and the writer overlap (at most ~4 tensors in flight).
    def tensor(self, name: str) -> Tensor:
        """Output tensor `name` (a CPU tensor of its spec's dtype and shape)."""
        if name in self._ready:
            return self._ready.pop(name)
        unit = self._unit_of.get(name)
        if unit is None:
            raise KeyError(name)
        out = self._unit_outputs(unit)
        self._ready.update((k, v) for k, v in out.items() if k != name)
        return out[name]

    def produce(self, spec) -> Tensor:
        """`tensor(spec.name)`: the `produce` callback of `ernie45.convert.safetensors_io.write_shards`."""
        return self.tensor(spec.name)

    def __iter__(self) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) for every output tensor, in `specs` order."""
        for spec in self.specs:
            yield spec.name, self.tensor(spec.name)

    def quantize(self, module: str) -> dict[str, Tensor]:
        """Read Linear `module`'s float weight (and bias) and quantize it: {output name: tensor} of its tensors
        (`module.weight`, `module.weight_scale`, ..., `module.bias`), recorded in `report`. The quantized token
        embedding is module "model.embed_tokens"."""
        return self._compute(module, self._read(module))

    def close(self) -> None:
        """Stop the prefetch threads (work under way finishes; queued work is dropped)."""
        for fut in (*self._computing.values(), *self._reading.values()):
            fut.cancel()
        self._computing.clear()
        self._reading.clear()
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools = []

    def __enter__(self) -> StreamQuantizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self, unit: str) -> dict[str, Tensor | None]:
        if unit == EMBED_TOKENS and self.embedding is not None:
            return {"weight": self.reader.read(EMBEDDING, dtype=self._plan[EMBEDDING][0])}
        if unit not in self.targets:
            return {unit: self._source(unit)}
        src = EMBEDDING if unit == "lm_head" and self._source_tied else f"{unit}.weight"
        bias = f"{unit}.bias" if self._has_bias[unit] else None
        return {"weight": self._source(src), "bias": None if bias is None else self._source(bias)}

    def _compute(self, unit: str, source: dict[str, Tensor | None] | Future) -> dict[str, Tensor]:
        if isinstance(source, Future):
            source = source.result()
        if unit == EMBED_TOKENS and self.embedding is not None:
            return self._compute_embedding(source["weight"])
        if unit not in self.targets:
            return source
        n, k = self.targets[unit]
        lin = nn.Linear(k, n, bias=self._has_bias[unit], device="meta")
        lin.weight = nn.Parameter(source["weight"], requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(source["bias"], requires_grad=False)
        with torch.no_grad():
            new, err = quantize_linear(
                lin, self.mode, self.dtype, group_size=self.group_size or 128, threshold=self.threshold
            )
        out = {f"{unit}.{key}": t for key, t in new.state_dict().items()}
        with self._lock:
            if unit not in self._layers:
                calibrated = (
                    (0, 0.0) if self.mode == "llm.int8" else (None, None)
                )  # as quantize_model records
                self._layers[unit] = LayerReport(unit, (n, k), err, *calibrated)
                self._bytes_before += _nbytes((lin.weight, lin.bias))
                self._bytes_after += _nbytes(out.values())
        return out

    def _compute_embedding(self, weight: Tensor) -> dict[str, Tensor]:
        emb = nn.Embedding(*self.embedding, device="meta")
        emb.weight = nn.Parameter(weight, requires_grad=False)
        with torch.no_grad():
            new, err = quantize_embedding_module(emb, self.dtype)
        out = {f"{EMBED_TOKENS}.{key}": t for key, t in new.state_dict().items()}
        with self._lock:
            if self._embedding_report is None:
                self._embedding_report = LayerReport(EMBED_TOKENS, tuple(weight.shape), err)
                self._embedding_bytes = (_nbytes((weight,)), _nbytes(out.values()))
        return out

    def _unit_outputs(self, unit: str) -> dict[str, Tensor]:
        i = self._unit_index[unit]
        if not self.prefetch:
            return self._compute(unit, self._read(unit))
        done = self._computing.pop(i, None)
        source = self._reading.pop(i, None)
        for j in [j for j in self._computing if j != i + 1]:  # asked out of order: drop stale prefetches
            self._computing.pop(j).cancel()
        for j in [j for j in self._reading if not i < j <= i + 2]:
            self._reading.pop(j).cancel()
        if done is None and source is None:
            source = self._submit(0, self._read, unit)  # every read on the reading thread, in order
        self._schedule(i + 1)
        return done.result() if done is not None else self._compute(unit, source)

    def _schedule(self, j: int) -> None:
        if j < len(self._units) and j not in self._computing:
            source = self._reading.pop(j, None) or self._submit(0, self._read, self._units[j])
            self._computing[j] = self._submit(1, self._compute, self._units[j], source)
        if j + 1 < len(self._units) and j + 1 not in self._reading and j + 1 not in self._computing:
            self._reading[j + 1] = self._submit(0, self._read, self._units[j + 1])

    def _submit(self, which: int, fn, *args) -> Future:
        """Run fn(*args) on the reading (0) or the quantizing (1) thread."""
        if not self._pools:
            n = torch.get_num_threads()  # the quantizing thread gets this thread's count, the reader one
            self._pools = [
                ThreadPoolExecutor(1, "ernie45-read", initializer=torch.set_num_threads, initargs=(1,)),
                ThreadPoolExecutor(1, "ernie45-quant", initializer=torch.set_num_threads, initargs=(n,)),
            ]
            for pool in self._pools:  # start both now, then give new threads the default back
                pool.submit(int).result()
            torch.set_num_threads(n)
        return self._pools[which].submit(fn, *args)

    @property
    def report(self) -> QuantReport:
        """The QuantReport of the Linears (and embedding) quantized so far, in model order (as `quantize_model`
        returns it)."""
        layers = sorted(self._layers.values(), key=lambda r: self._order[r.name])
        before, after = self._embedding_bytes
        return QuantReport(
            self.mode, layers, self._bytes_before + before, self._bytes_after + after, self._embedding_report
        )
