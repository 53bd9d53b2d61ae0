"""Speculative decoding for one sequence: draft k tokens cheaply, score the current token and the k drafts in one
pass over the weights, keep the longest prefix the target model agrees with.

Batch-1 decode reads every weight once per token and is bound by memory bandwidth; scoring k + 1 positions in one
pass costs little more than one, so each accepted draft is a token for (almost) free.

Drafters:
- "mtp": the checkpoint's multi-token-prediction layer (`ernie45.mtp`), one draft per MTP pass; k > 1 chains the
  layer on its own output (vLLM's way of running a one-layer MTP head for several tokens).
- "ngram": prompt lookup (vLLM's `prompt_lookup_min` / `prompt_lookup_max`): the longest n-gram (min <= n <= max)
  ending the sequence is searched for earlier in it, rightmost occurrence first, and the tokens that followed it
  are the drafts. Works for any model, dense included; pays off when the output copies the prompt.

Verification: greedy accepts a draft when it equals the target's argmax, so the tokens are those of plain
decoding. Sampling uses the standard rejection rule (Leviathan et al. 2023; Chen et al. 2023): accept draft d
with probability min(1, p(d) / q(d)), else draw from norm(max(0, p - q)), and draw one more token from p when
every draft was accepted; the output distribution is p's. q is one-hot for ngram drafts and greedy MTP drafts.

Scoring runs the PyTorch forward over k + 1 positions with the KV cache, or, where the C decode step is attached
(`ernie45.fast`), one `FastDecoder.step_batch` whose k + 1 rows are the positions of this one sequence sharing one
block table: the step stores every row's keys/values before any row attends, so row i sees rows < i, and row i's
logits are bit for bit those of plain decoding. A rejection is undone by setting the cache length back (the
entries past it are overwritten later). The MTP drafter reads the target's hidden states at the scored positions,
which the C step writes beside the logits (`hidden_out`).

`draft_vocab_size` (mtp): the MTP layer scores only that many of the most frequent tokens (`ernie45.mtp.draft_ids`),
most of its cost being the full-vocabulary lm_head; verification is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ernie45.errors import ErnieError

METHODS = ("mtp", "ngram")
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_TOKENS = {"mtp": 1, "ngram": 3}
# vLLM's matching rule; its defaults are 5 and 5, shorter n-grams find more drafts in short answers
DEFAULT_LOOKUP_MIN, DEFAULT_LOOKUP_MAX = 2, 5


@dataclass
class Speculative:
    """What to speculate with, and the counts of a run (added to by every sequence decoded with it).

    `drafted`: draft tokens scored; `accepted`: drafts the target kept; `steps`: verification passes.
    """

    method: str
    num_speculative_tokens: int | None = None
    draft_vocab_size: int | None = None
    prompt_lookup_min: int = DEFAULT_LOOKUP_MIN
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX
    drafted: int = 0
    accepted: int = 0
    steps: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ErnieError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.num_speculative_tokens is None:
            self.num_speculative_tokens = DEFAULT_TOKENS[self.method]
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ErnieError(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        v = self.draft_vocab_size
        if v is not None and (self.method != "mtp" or not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ErnieError(f"draft_vocab_size applies to mtp drafts and must be a positive integer, got {v!r}"
                             + ("" if self.method == "mtp" else f" with {self.method}"))
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ErnieError(f"prompt lookup needs 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo} and {hi}")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def stats(self) -> dict[str, Any]:
        """The counts as `ernie45 generate --json` prints them."""
        return {"method": self.method, "drafted": self.drafted, "accepted": self.accepted}


def resolve_speculative(model: Any, speculative: Speculative | str | None,
                        num_speculative_tokens: int | None = None) -> Speculative | None:
    """A `Speculative` from the `speculative=` argument (a method name or an instance), checked against the model."""
    if speculative is None:
        if num_speculative_tokens is not None:
            raise ErnieError("num_speculative_tokens needs speculative='mtp' or 'ngram'")
        return None
    if isinstance(speculative, str):
        speculative = Speculative(speculative, num_speculative_tokens)
    elif num_speculative_tokens is not None:
        raise ErnieError("pass num_speculative_tokens inside the Speculative object")
    if speculative.method == "mtp":
        require_mtp(model)
    return speculative


def require_mtp(model: Any) -> None:
    """One-line error for `mtp` drafts on a model without an MTP layer. `ernie45.mtp.attach_mtp` gives a model its
    layer and the class that runs it (`mtp_head_class`), so this module imports neither it nor the model."""
    if getattr(model, "mtp_head_class", None) is None:
        name = getattr(model, "name_or_path", None) or "this model"
        raise ErnieError(f"{name} has no MTP layer (num_nextn_predict_layers > 0 and model.mtp_* weights): use "
                         "--speculative ngram, or a checkpoint that ships the MTP head")


@contextmanager
def capture_pre_norm(model: Any):
    """Record the input of the model's final norm (the pre-norm hidden states) while the block runs: `box[0]`
    after a forward. A hook, so the forward itself is untouched."""
    box: list[Tensor | None] = [None]

    def hook(_mod, args):
        box[0] = args[0]

    handle = model.model.norm.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def forward_keeping(model: Any, ids: Tensor, cache: Any, keep: bool, pre_norm: bool, **kw) -> tuple[Any, Tensor | None]:
    """`model(ids, cache=cache, **kw)` and, with `keep`, the hidden states of every position an MTP layer reads: the
    final norm's output, or with `pre_norm` its input; else None."""
    if not keep:
        return model(ids, cache=cache, **kw), None
    with capture_pre_norm(model) as box:
        out = model(ids, cache=cache, **kw)
    return out, box[0] if pre_norm else out.hidden_states


# ---- drafters ------------------------------------------------------------------------------------------
def ngram_drafts(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: the up to k tokens that followed the rightmost earlier occurrence of the longest n-gram
    (n_min <= n <= n_max) that ends `tokens`; [] when none occurs (vLLM's `NgramProposer` rule)."""
    T = len(tokens)
    for n in range(min(n_max, T - 1), n_min - 1, -1):
        pattern = tokens[T - n:]
        first = pattern[0]
        for i in range(T - n - 1, -1, -1):  # rightmost start first, never the suffix itself
            if tokens[i] == first and tokens[i:i + n] == pattern:
                return tokens[i + n:i + n + k]
    return []


class _MTPDrafter:
    """The MTP layer next to the target: fed (x_{j+1}, h_j) for every position the target has settled, it
    guesses x_{j+2} from the last one; its cache length always equals the target cache's."""

    def __init__(self, model: Any, max_len: int, cache: Any = None, draft_vocab: tuple[int, Any] | None = None):
        require_mtp(model)
        self.head = _mtp_head(model, draft_vocab)
        self.cache = cache if cache is not None and cache.max_len >= max_len else self.head.new_cache(max_len)
        self.logits: Tensor | None = None  # (V,) the guess for the token after the settled ones
        self.out: Tensor | None = None  # (1, 1, H) the layer's output there (a chained draft's input)

    def settle(self, next_tokens: Tensor, hidden: Tensor) -> None:
        """next_tokens (1, n) and the target's hidden states (1, n, H) at the next n positions."""
        logits, out = self.head(next_tokens, hidden, self.cache, last_only=True)
        self.logits, self.out = logits[0, -1], out[:, -1:]

    def draft(self, k: int, pick) -> tuple[list[int], list[Tensor | None]]:
        """k drafts, chaining the layer on its own output; the cache is left as it was. `pick(logits (V,))` ->
        (token, its draft distribution or None for a deterministic pick)."""
        start = self.cache.length
        toks, qs = [], []
        logits, out = self.logits, self.out
        for i in range(k):
            t, q = pick(logits)
            toks.append(t)
            qs.append(q)
            if i + 1 < k:
                lg, out = self.head(torch.tensor([[t]], device=out.device), out, self.cache, last_only=True)
                logits, out = lg[0, -1], out[:, -1:]
        self.cache.length = start
        return toks, qs


def _mtp_head(model: Any, draft_vocab: tuple[int, Any] | None) -> Any:
    """The model's `MTPHead` (ernie45.mtp), full or over a draft vocabulary (size, tokenizer), kept on the model
    per size and C decoder: gathering a reduced head's rows is a copy of a few tens of MB, made once."""
    size, tokenizer = draft_vocab if draft_vocab is not None else (None, None)
    key = (size, id(getattr(model, "fast_decoder", None)))
    heads = model.__dict__.setdefault("_mtp_heads", {})
    if key not in heads:
        cls = model.mtp_head_class
        if size is not None and tokenizer is None:
            raise ErnieError("draft_vocab_size needs the model's tokenizer (pass tokenizer= to generate)")
        heads[key] = cls(model) if size is None else cls.with_draft_vocab(model, tokenizer, size)
    return heads[key]


# ---- scoring -------------------------------------------------------------------------------------------
def _c_path(model: Any, cache: Any) -> Any:
    """The attached C decoder when it can score rows of this (batch-1, contiguous) cache, else None."""
    fast = getattr(model, "fast_decoder", None)
    return fast if fast is not None and fast.reads(cache) else None


def score(model: Any, tokens: list[int], cache: Any, need_hidden: bool = False,
          pre_norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """Feed `tokens` (the current token, then drafts) at positions cache.length...; -> (logits (n, V) fp32,
    hidden (1, n, H) or None). The cache length advances by n (the caller sets it back on a rejection)."""
    from ernie45.generation.decode import decode_step

    n, L = len(tokens), cache.length
    if L + n > cache.max_len:
        raise ValueError(f"KV cache overflow: {L} + {n} > {cache.max_len}")
    fast = _c_path(model, cache)
    if fast is not None:
        if n == 1 and not need_hidden:
            return fast(torch.tensor([tokens]), cache), None
        hidden = torch.empty(n, fast.hidden, dtype=torch.float32) if need_hidden else None
        logits = fast.feed(tokens, cache, hidden_out=hidden, pre_norm=pre_norm)
        # the C step's hidden states hold model-dtype values (bf16 rounded in a bf16 model): converting is exact
        return logits, None if hidden is None else hidden.to(model.dtype)[None]
    ids = torch.tensor([tokens], device=model.device)
    if n == 1 and not need_hidden:
        pos = torch.full((1, 1), L, dtype=torch.long, device=model.device)
        return decode_step(model, ids, cache, None, pos).float(), None
    out, hidden = forward_keeping(model, ids, cache, need_hidden, pre_norm)
    return out.logits[0].float(), hidden


def prefill(model: Any, ids: Tensor, cache: Any, need_hidden: bool = False,
            pre_norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """Feed the prompt `ids` (1, n) -> (the last row's logits (1, V) fp32, hidden (1, n, H) of every position, or
    None), the way `generate` prefills: the rows of one C step where that applies (`FastDecoder.prefill`), else the
    PyTorch forward. The cache then holds what plain decoding's holds, bit for bit, so greedy tokens stay plain
    decoding's even at a near-tie of two logits (int4 rows in C round activations to int8; PyTorch's do not)."""
    fast = _c_path(model, cache)
    if fast is not None:
        hidden = torch.empty(ids.shape[1], fast.hidden, dtype=torch.float32) if need_hidden else None
        logits = fast.prefill(ids, cache, hidden_out=hidden, pre_norm=pre_norm)
        if logits is not None:
            return logits, None if hidden is None else hidden.to(model.dtype)[None]
    out, hidden = forward_keeping(model, ids, cache, need_hidden, pre_norm, logits_to_keep=1)
    return out.logits[0, -1:].float(), hidden


# ---- the loop ------------------------------------------------------------------------------------------
def _draw(probs: Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def accept_drafts(drafts: list[int], target: list[Tensor], draft_probs: list[Tensor | None] | None,
                  generator: torch.Generator | None) -> tuple[int, int]:
    """The rejection rule over target distributions p_0..p_k (k + 1 probability vectors) and drafts d_1..d_k
    with their draft distributions (None: one-hot at the draft). -> (drafts accepted a, the token after them):
    a draft is kept with probability min(1, p(d) / q(d)); the first rejected one is replaced by a draw from
    norm(max(0, p - q)); when all are kept, one more token is drawn from p_k. The result is distributed as p."""
    for i, d in enumerate(drafts):
        p = target[i]
        q = draft_probs[i] if draft_probs is not None else None
        qd = 1.0 if q is None else float(q[d])
        u = float(torch.rand((), generator=generator, device=p.device))
        if qd > 0 and u < float(p[d]) / qd:
            continue
        residual = p.clone()
        if q is None:
            residual[d] = 0
        else:
            residual = (residual - q).clamp_(min=0)
        total = float(residual.sum())
        return i, _draw(residual / total if total > 0 else p, generator)
    return len(drafts), _draw(target[len(drafts)], generator)


def speculative_decode(
    model: Any,
    ids: Tensor,
    cfg: Any,
    max_new: int,
    min_new: int,
    spec: Speculative,
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    prompt_cache: Any = None,
) -> Iterator[Any]:
    """`generate._decode` for one sequence with speculation: yields, per token in order, the fields of a
    `generate.Step` (tokens, finished, finish_reasons, sequences, scores, logits) as a tuple."""
    with torch.inference_mode():
        yield from _speculative(model, ids, cfg, max_new, min_new, spec, tokenizer, generator, output_scores,
                                output_logits, prompt_cache)


def _speculative(model, ids, cfg, max_new, min_new, spec, tokenizer, generator, output_scores, output_logits,
                 prompt_cache) -> Iterator[Any]:
    from ernie45.generation.decode import pad_token_id
    from ernie45.generation.sampling import apply_all, make_processors, make_warpers
    from ernie45.generation.streaming import ends_with_stop_string

    if ids.shape[0] != 1:
        raise ErnieError("speculative decoding runs one sequence (batch 1, num_return_sequences=1)")
    S = ids.shape[1]
    dev = ids.device
    eos_set = set(cfg.eos_token_ids)
    stops = cfg.stop_string_list
    total = S + max_new
    k_max = spec.num_speculative_tokens
    seq = torch.full((1, total + k_max), pad_token_id(cfg), dtype=torch.long, device=dev)  # room for drafts
    seq[:, :S] = ids
    processors = make_processors(prompt_len=S, repetition_penalty=cfg.repetition_penalty,
                                 presence_penalty=cfg.presence_penalty, frequency_penalty=cfg.frequency_penalty,
                                 no_repeat_ngram_size=cfg.no_repeat_ngram_size, min_new_tokens=min_new,
                                 eos_token_ids=cfg.eos_token_ids, device=dev)
    sampling = cfg.do_sample
    warpers = make_warpers(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, min_p=cfg.min_p) \
        if sampling else []
    use_mtp = spec.method == "mtp"

    def target_scores(raw: Tensor, upto: int) -> Tensor:
        """Processed (1, V) scores of the logits row predicting position `upto` (prefix seq[:upto])."""
        return apply_all(processors, seq[:, :upto], raw[None])

    def probs_of(scores: Tensor) -> Tensor:
        for w in warpers:
            scores = w(scores)
        return F.softmax(scores, dim=-1)[0]

    def pick_draft(lg: Tensor) -> tuple[int, Tensor | None]:
        """An MTP draft: its argmax when greedy, else a draw from its warped distribution q (returned)."""
        if not sampling:
            return int(lg.argmax()), None
        q = probs_of(lg.float()[None])
        return _draw(q, generator), q

    tokens_held: list[int] = ids[0].tolist()  # the sequence so far, for prompt lookup and stop strings
    generated: list[int] = []
    taken = None
    if prompt_cache is not None:
        taken = prompt_cache.take(model, tokens_held, total - 1)
    cache, reused = taken or (model.new_cache(1, total - 1), 0)
    drafter = None
    if use_mtp:
        # the MTP cache a PromptCache keeps beside its own: (model, cache, valid length)
        held = getattr(prompt_cache, "_mtp_state", None) if taken is not None else None
        held = held if held is not None and held[0] is model else None
        vocab = (spec.draft_vocab_size, tokenizer) if spec.draft_vocab_size is not None else None
        drafter = _MTPDrafter(model, cache.max_len, held[1] if held is not None else None, vocab)
        # MTP entry j was made from x_{j+1} and h_j: it holds while x_0..x_{j+1} match, and the target's h_j must
        # be recomputed for the first entry made now
        mtp_len = held[2] if held is not None and drafter.cache is held[1] else 0
        reused = min(max(reused - 1, 0), mtp_len)
        cache.length = drafter.cache.length = reused
        if prompt_cache is not None:
            prompt_cache.reused = reused
    base = S - 1  # the cache length before the last pass; the pass's first logits row predicts position base + 1
    accepted = 0
    try:
        pre_norm = use_mtp and drafter.head.wants_pre_norm()
        logits, hidden = prefill(model, ids[:, reused:], cache, use_mtp, pre_norm)
        # logits (n, V): rows predicting positions cur, cur + 1, ...; one row after a plain step
        pending_drafts: list[int] = []
        draft_q: list[Tensor | None] | None = None
        n_out = 0
        finished = False
        while not finished:
            cur = S + n_out  # the position the first logits row predicts
            rows = logits.shape[0]
            accepted, last = 0, None
            if rows == 1:
                sc = target_scores(logits[0], cur)
                new = [int(sc.argmax(-1)) if not sampling else _draw(probs_of(sc), generator)]
                step_scores = [sc]
            else:
                ks = rows - 1
                step_scores = []
                for i in range(rows):  # scores of row i need the drafts before it in the prefix
                    if i:
                        seq[0, cur + i - 1] = pending_drafts[i - 1]
                    step_scores.append(target_scores(logits[i], cur + i))
                if sampling:
                    target = [probs_of(s) for s in step_scores]
                    accepted, last = accept_drafts(pending_drafts, target, draft_q, generator)
                else:
                    accepted = 0
                    while accepted < ks and int(step_scores[accepted].argmax(-1)) == pending_drafts[accepted]:
                        accepted += 1
                    last = int(step_scores[accepted].argmax(-1))
                spec.drafted += ks
                spec.accepted += accepted
                spec.steps += 1
                new = pending_drafts[:accepted] + [last]
            for j, t in enumerate(new):
                pos = cur + j
                seq[0, pos] = t
                tokens_held.append(t)
                n_out += 1
                reason = None
                if stops:
                    generated.append(t)
                if t in eos_set:
                    reason = "stop"
                elif stops and ends_with_stop_string(tokenizer, generated, stops):
                    reason = "stop"
                elif n_out == max_new:
                    reason = "length"
                finished = reason is not None
                raw = logits[min(j, rows - 1)][None]
                yield ([t], [finished], [reason], seq[:, : pos + 1],
                       step_scores[min(j, rows - 1)] if output_scores else None, raw if output_logits else None)
                if finished:
                    break
            if finished:
                break
            # the cache entries that hold: positions up to the last accepted draft (the newest token is not fed)
            L = base + accepted + 1
            cache.length = L
            if use_mtp:
                # the drafter settles positions whose hidden states the last pass gave: (x_{j+1}, h_j)
                drafter.cache.length = min(drafter.cache.length, L)
                first = drafter.cache.length
                nxt = seq[:, first + 1:L + 1]  # (1, L - first)
                # hidden's last row is position base + rows - 1 (the pass's last position)
                start = hidden.shape[1] - rows - base + first
                h = hidden[:, start:start + L - first]  # (1, L - first, H): h_first .. h_{L-1}
                drafter.settle(nxt, h)
            room = max_new - n_out - 1  # drafts past the length limit would never be emitted
            k = min(k_max, room)
            draft_q = None
            if k <= 0:
                pending_drafts = []
            elif use_mtp:
                pending_drafts, draft_q = drafter.draft(k, pick_draft)
                if not sampling:
                    draft_q = None
            else:
                pending_drafts = ngram_drafts(tokens_held, k, spec.prompt_lookup_min, spec.prompt_lookup_max)
            base = L
            logits, hidden = score(model, [tokens_held[-1], *pending_drafts], cache, need_hidden=use_mtp,
                                   pre_norm=pre_norm)
    finally:
        valid = min(cache.length, base + accepted + 1, len(tokens_held) - 1)  # rejected drafts' entries do not
        if taken is not None:
            prompt_cache.keep(tokens_held[:valid])
            if use_mtp:
                prompt_cache._mtp_state = (model, drafter.cache, min(drafter.cache.length, valid))
