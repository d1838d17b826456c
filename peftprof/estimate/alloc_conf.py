"""PYTORCH_CUDA_ALLOC_CONF, parsed as torch 2.13 parses it, for the allocator simulation (estimate/allocator.py)
and for validating the scenario key `[run] cuda_alloc_conf`.

Sources (torch 2.13): c10/core/AllocatorConfig.h (ConfigTokenizer: tokens split at `,` `:` `[` `]`, whitespace
dropped; defaults: large_segment_size 20 MiB, max_split_size unlimited, garbage_collection_threshold 0, expandable
segments off) and c10/core/AllocatorConfig.cpp (AcceleratorAllocatorConfig::parseArgs, parseMaxSplitSize and
parseMaxNonSplitRoundingSize: values in MiB, at least kLargeBuffer = 20; parseGarbageCollectionThreshold: in
(0, 1); parseRoundUpPower2Divisions: a power of 2, or a list `[interval_mb:divisions, ..., >:divisions]` over 16
power-of-2 intervals from 1 MiB to 64 GiB; expandable_segments: True | False), c10/cuda/CUDAAllocatorConfig.h
(the CUDA-only keys; per_process_memory_fraction sets the allowed maximum, DeviceCachingAllocator's constructor
calls setMemoryFraction with it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1 << 20
LARGE_BUFFER_BYTES = 20 * MIB  # kLargeBuffer / the default large_segment_size
N_ROUNDUP_INTERVALS = 16  # kRoundUpPowerOfTwoIntervals: 1 MiB, 2 MiB, ... 32 GiB and above
ALLOWED = ("comma-separated key:value pairs: expandable_segments:True|False, max_split_size_mb:<int >= 20>, "
           "max_non_split_rounding_mb:<int >= 20>, garbage_collection_threshold:<number in (0, 1)>, "
           "roundup_power2_divisions:<power of 2> or [<MiB power of 2>:<power of 2 or 0>, ..., >:<n>], "
           "large_segment_size_mb:<int >= 1>, per_process_memory_fraction:<number in [0, 1]>, backend:native; "
           "e.g. \"expandable_segments:True,max_split_size_mb:128\"")
# keys torch accepts that change nothing the simulation models (host/pinned memory, locking, graph capture)
_BOOL_IGNORED = ("release_lock_on_cudamalloc", "pinned_use_cuda_host_register", "pinned_use_background_threads",
                 "pinned_free_catch_all", "graph_capture_record_stream_reuse", "throw_on_cudamalloc_oom")
_INT_IGNORED = ("pinned_num_register_threads", "pinned_reserve_segment_size_mb", "pinned_max_round_threshold")


class AllocConfError(ValueError):
    """A malformed PYTORCH_CUDA_ALLOC_CONF; the message is one line naming the option and what is allowed."""


@dataclass(frozen=True)
class AllocConf:
    expandable_segments: bool = False
    max_split_size_bytes: int | None = None  # None: unlimited (every block can be split)
    max_non_split_rounding_bytes: int = LARGE_BUFFER_BYTES
    garbage_collection_threshold: float = 0.0
    roundup_power2_divisions: tuple[int, ...] = field(default=(0,) * N_ROUNDUP_INTERVALS)
    large_segment_size_bytes: int = LARGE_BUFFER_BYTES
    per_process_memory_fraction: float = 1.0

    def divisions_for(self, size_bytes: int) -> int:
        """AcceleratorAllocatorConfig::roundup_power2_divisions(size): the interval of floor(log2(size)),
        counted from 1 MiB and clamped to the 16 intervals."""
        index = max(0, min(size_bytes.bit_length() - 1 - 20, N_ROUNDUP_INTERVALS - 1))
        return self.roundup_power2_divisions[index]


def _tokens(text: str) -> list[str]:
    """ConfigTokenizer: separators are tokens of their own; whitespace is dropped."""
    out, buf = [], ""
    for ch in text:
        if ch in ",:[]":
            if buf:
                out.append(buf)
                buf = ""
            out.append(ch)
        elif not ch.isspace():
            buf += ch
    if buf:
        out.append(buf)
    return out


def _power_of_2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _int(key: str, token: str | None, what: str) -> int:
    if token is None or not token.isdigit():
        raise AllocConfError(f"{key}: expected {what}, got {token!r}")
    return int(token)


def _number(key: str, token: str | None, what: str) -> float:
    try:
        value = float(token) if token is not None else None
    except ValueError:
        value = None
    if value is None or value != value:
        raise AllocConfError(f"{key}: expected {what}, got {token!r}")
    return value


def _bool(key: str, token: str | None) -> bool:
    if token not in ("True", "False"):
        raise AllocConfError(f"{key}: expected True or False (capitalised, as torch requires), got {token!r}")
    return token == "True"


def _divisions(key: str, tok: list[str], i: int) -> tuple[tuple[int, ...], int]:
    """parseRoundUpPower2Divisions; returns (divisions per interval, index of the last token used)."""
    if i >= len(tok):
        raise AllocConfError(f"{key}: expected a power of 2 or a list [<MiB>:<divisions>, ..., >:<divisions>]")
    if tok[i] != "[":
        n = _int(key, tok[i], "a power of 2")
        if not _power_of_2(n):
            raise AllocConfError(f"{key}: the divisions must be a power of 2, got {n}")
        return (n,) * N_ROUNDUP_INTERVALS, i
    div = [0] * N_ROUNDUP_INTERVALS
    first, last_index = True, 0
    i += 1
    while i < len(tok) and tok[i] != "]":
        interval = tok[i]
        if i + 2 >= len(tok) or tok[i + 1] != ":":
            raise AllocConfError(f"{key}: expected <interval MiB>:<divisions> inside [...]")
        n = _int(key, tok[i + 2], "divisions (a power of 2, or 0 to disable)")
        if n != 0 and not _power_of_2(n):
            raise AllocConfError(f"{key}: divisions must be a power of 2 or 0, got {n}")
        if interval == ">":
            div[last_index + 1:] = [n] * (N_ROUNDUP_INTERVALS - last_index - 1)
        else:
            mb = _int(key, interval, "an interval in MiB (a power of 2) or >")
            if not _power_of_2(mb):
                raise AllocConfError(f"{key}: intervals must be powers of 2 (MiB), got {mb}")
            index = min(mb.bit_length() - 1, N_ROUNDUP_INTERVALS - 1)
            if first:
                div[:index] = [n] * index
                first = False
            div[index] = n
            last_index = index
        i += 3
        if i < len(tok) and tok[i] == ",":
            i += 1
    if i >= len(tok):
        raise AllocConfError(f"{key}: missing the closing ]")
    return tuple(div), i


def parse_alloc_conf(text: str | None) -> AllocConf:
    """The allocator settings a PYTORCH_CUDA_ALLOC_CONF string gives; AllocConfError (one line) if malformed."""
    if not text:
        return AllocConf()
    if not isinstance(text, str):
        raise AllocConfError(f"expected a string, got {text!r}")
    tok = _tokens(text)
    kw: dict = {}
    i = 0
    while i < len(tok):
        key = tok[i]
        if key in ",:[]":
            raise AllocConfError(f"unexpected {key!r} where an option name belongs; allowed: {ALLOWED}")
        if i + 1 >= len(tok) or tok[i + 1] != ":":
            raise AllocConfError(f"{key}: expected {key}:<value>")
        i += 2
        value = tok[i] if i < len(tok) else None
        if key == "expandable_segments":
            kw["expandable_segments"] = _bool(key, value)
        elif key in ("max_split_size_mb", "max_non_split_rounding_mb"):
            mb = _int(key, value, "a whole number of MiB >= 20")
            if mb < LARGE_BUFFER_BYTES // MIB:
                raise AllocConfError(f"{key}: too small, must be >= {LARGE_BUFFER_BYTES // MIB} (MiB), got {mb}")
            kw["max_split_size_bytes" if key == "max_split_size_mb" else "max_non_split_rounding_bytes"] = mb * MIB
        elif key == "garbage_collection_threshold":
            x = _number(key, value, "a number in (0, 1)")
            if not 0 < x < 1:
                raise AllocConfError(f"{key}: must be in (0.0, 1.0), got {value}")
            kw["garbage_collection_threshold"] = x
        elif key == "roundup_power2_divisions":
            kw["roundup_power2_divisions"], i = _divisions(key, tok, i)
        elif key == "large_segment_size_mb":
            mb = _int(key, value, "a whole number of MiB >= 1")
            if mb < 1:
                raise AllocConfError(f"{key}: must be >= 1 (MiB), got {mb}")
            kw["large_segment_size_bytes"] = mb * MIB
        elif key == "per_process_memory_fraction":
            x = _number(key, value, "a number in [0, 1]")
            if not 0 <= x <= 1:
                raise AllocConfError(f"{key}: must be in [0, 1], got {value}")
            kw["per_process_memory_fraction"] = x
        elif key == "backend":
            if value == "cudaMallocAsync":
                raise AllocConfError("backend:cudaMallocAsync is not simulated (CUDA's own pool allocator); "
                                     "allowed: backend:native")
            if value != "native":
                raise AllocConfError(f"backend: unknown allocator backend {value!r}; allowed: native")
        elif key in _BOOL_IGNORED:
            _bool(key, value)
        elif key in _INT_IGNORED:
            _int(key, value, "a whole number")
        else:
            raise AllocConfError(f"unknown option {key!r}; allowed: {ALLOWED}")
        i += 1
        if i < len(tok):
            if tok[i] != ",":
                raise AllocConfError(f"{key}: expected a comma after its value, got {tok[i]!r}")
            i += 1
    return AllocConf(**kw)


def alloc_conf_problems(text) -> list[str]:
    """Validation of the scenario key `[run] cuda_alloc_conf`: [] or one message naming what is allowed."""
    if not isinstance(text, str):
        return [f"must be a string such as \"expandable_segments:True\", got {text!r}"]
    try:
        parse_alloc_conf(text)
    except AllocConfError as e:
        return [str(e)]
    return []
