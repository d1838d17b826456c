"""A simulation of PyTorch's CUDA caching allocator (c10/cuda/CUDACachingAllocator.cpp, torch 2.13:
DeviceCachingAllocator), fed with a trace's alloc/free events in order, to predict what the GPU really reserves.

Every rule names the function of CUDACachingAllocator.cpp it follows. One device, one stream, no CUDA graphs or
private pools, no cross-stream uses (record_stream events): what a single-stream training step does. Addresses of
new segments are not knowable on a CPU: cudaMalloc is modelled as a bump allocator (2 MiB aligned), which only
matters where two free blocks of equal size tie on address; `replay_snapshot` feeds the recorded addresses.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from .alloc_conf import AllocConf, parse_alloc_conf

MIN_BLOCK_BYTES = 512  # kMinBlockSize: every request is rounded to a multiple of 512 B
SMALL_SIZE_BYTES = 1 << 20  # kSmallSize: requests up to 1 MiB use the small pool
SMALL_BUFFER_BYTES = 2 << 20  # kSmallBuffer: small-pool segments (and expandable small-pool pages) are 2 MiB
MIN_LARGE_ALLOC_BYTES = 10 << 20  # kMinLargeAlloc: 1-10 MiB requests get a large_segment_size segment
ROUND_LARGE_BYTES = 2 << 20  # kRoundLarge: larger requests get a segment rounded up to 2 MiB
ADDRESS_BASE = 1 << 40
DEFAULT_ADDRESS_SPACE_BYTES = 1 << 44  # expandable segments' reserved virtual space when no GPU size is given


class AllocatorOOM(MemoryError):
    """malloc found no block and could not create one even after freeing cached blocks (the OOM path)."""

    def __init__(self, request_bytes: int, allocated_bytes: int, reserved_bytes: int):
        super().__init__(f"CUDA out of memory: tried to allocate {request_bytes:,} B with {allocated_bytes:,} B "
                         f"allocated and {reserved_bytes:,} B reserved")
        self.request_bytes, self.allocated_bytes, self.reserved_bytes = request_bytes, allocated_bytes, reserved_bytes


@dataclass(eq=False)
class Block:
    size: int
    addr: int
    pool: Pool
    es: ExpandableSegment | None = None
    mapped: bool = True
    allocated: bool = False
    requested: int = 0
    prev: Block | None = None
    next: Block | None = None
    gc_count_base: int = 0

    def is_split(self) -> bool:
        return self.prev is not None or self.next is not None

    def splice(self, before: Block | None, after: Block | None) -> None:  # Block::splice
        if before is not None:
            before.next = self
        self.prev = before
        if after is not None:
            after.prev = self
        self.next = after


class Pool:
    """BlockPool: free mapped blocks ordered by (size, address) (BlockComparatorSize, one stream) and unmapped
    expandable ranges ordered by address (BlockComparatorAddress)."""

    def __init__(self, is_small: bool):
        self.is_small = is_small
        self._keys: list[tuple[int, int]] = []
        self._by_key: dict[tuple[int, int], Block] = {}
        self._unmapped: list[int] = []
        self._unmapped_by_addr: dict[int, Block] = {}
        self.get_free_blocks_call_count = 0

    def insert(self, b: Block) -> None:  # BlockPool::insert_into_blocks (sets the gc age base)
        b.gc_count_base = self.get_free_blocks_call_count
        key = (b.size, b.addr)
        bisect.insort(self._keys, key)
        self._by_key[key] = b

    def remove(self, b: Block) -> None:
        key = (b.size, b.addr)
        del self._keys[bisect.bisect_left(self._keys, key)]
        del self._by_key[key]

    def lower_bound(self, size: int) -> int:
        return bisect.bisect_left(self._keys, (size, -1))

    def at(self, i: int) -> Block:
        return self._by_key[self._keys[i]]

    def __len__(self) -> int:
        return len(self._keys)

    def blocks(self) -> list[Block]:
        return [self._by_key[k] for k in self._keys]

    def add_unmapped(self, b: Block) -> None:
        bisect.insort(self._unmapped, b.addr)
        self._unmapped_by_addr[b.addr] = b

    def remove_unmapped(self, b: Block) -> None:
        del self._unmapped[bisect.bisect_left(self._unmapped, b.addr)]
        del self._unmapped_by_addr[b.addr]

    def unmapped(self) -> list[Block]:
        return [self._unmapped_by_addr[a] for a in self._unmapped]


class ExpandableSegment:
    """ExpandableSegment: a virtual range of `n_pages` pages (2 MiB small pool, large_segment_size large pool),
    pages mapped and unmapped one by one (cuMemCreate/cuMemMap)."""

    def __init__(self, base: int, page_bytes: int, n_pages: int):
        self.base, self.page_bytes, self.n_pages = base, page_bytes, n_pages
        self.mapped = bytearray(n_pages)

    @property
    def size(self) -> int:
        return self.page_bytes * self.n_pages

    def runs_delta(self, first: int, last: int, mapping: bool) -> int:
        """Change in the number of contiguous mapped ranges (snapshot() reports one segment per range)."""
        left = first > 0 and self.mapped[first - 1]
        right = last < self.n_pages and self.mapped[last]
        return (1 - left - right) if mapping else (left + right - 1)


@dataclass
class SimResult:
    peak_reserved_bytes: int
    peak_allocated_bytes: int
    reserved_at_peak_allocated_bytes: int
    n_segments: int  # segments (snapshot() view) when reserved peaked
    oom: dict | None  # the first allocation that found no memory: event index, request, allocated, reserved

    @property
    def fragmentation_bytes(self) -> int:
        """Reserved minus allocated when the allocated bytes peak: what the allocator holds beyond the tensors."""
        return self.reserved_at_peak_allocated_bytes - self.peak_allocated_bytes


@dataclass
class CachingAllocator:
    """DeviceCachingAllocator for one device and stream. `capacity_bytes`: what cudaMalloc / cuMemCreate can
    still obtain (None: unlimited); `total_memory_bytes`: the GPU's size (per_process_memory_fraction,
    expandable address space)."""

    conf: AllocConf = field(default_factory=AllocConf)
    capacity_bytes: int | None = None
    total_memory_bytes: int | None = None
    address_source: object = None  # callable(size) -> address of a new cudaMalloc segment (replay)

    def __post_init__(self):
        self.small, self.large = Pool(True), Pool(False)
        self.reserved_bytes = self.allocated_bytes = 0
        self.peak_reserved_bytes = self.peak_allocated_bytes = self.reserved_at_peak_allocated_bytes = 0
        self.n_malloc_segments = self.n_mapped_runs = self.n_segments_at_peak = 0
        self.segments_es: list[ExpandableSegment] = []
        self.active: dict[int, Block] = {}
        self.log: list[tuple[str, int, int]] = []  # (segment_alloc|segment_free|segment_map|segment_unmap, addr, size)
        self._next_addr = ADDRESS_BASE
        total = self.total_memory_bytes or self.capacity_bytes
        frac = self.conf.per_process_memory_fraction
        # setMemoryFraction: an allowed maximum only below 1.0 (allowed_memory_maximum is otherwise unset)
        self.allowed_max_bytes = int(frac * total) if frac < 1.0 and total is not None else None

    # --- sizes ----------------------------------------------------------------------------------------------
    def round_size(self, size: int) -> int:
        """round_size: 512 B minimum; with roundup_power2_divisions for the size's interval, up to the next of
        that many divisions between powers of 2 (roundup_power2_next_division); else a multiple of 512 B."""
        if size < MIN_BLOCK_BYTES:
            return MIN_BLOCK_BYTES
        divisions = self.conf.divisions_for(size)
        if divisions > 1 and size > MIN_BLOCK_BYTES * divisions:
            return roundup_power2_next_division(size, divisions)
        return -(-size // MIN_BLOCK_BYTES) * MIN_BLOCK_BYTES

    def allocation_size(self, size: int) -> int:
        """get_allocation_size: the cudaMalloc size for a rounded request that no cached block serves."""
        if size <= SMALL_SIZE_BYTES:
            return SMALL_BUFFER_BYTES
        if size < MIN_LARGE_ALLOC_BYTES:
            return self.conf.large_segment_size_bytes
        return -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES

    @property
    def _max_split(self) -> float:
        return self.conf.max_split_size_bytes if self.conf.max_split_size_bytes is not None else float("inf")

    # --- malloc / free ------------------------------------------------------------------------------------
    def malloc(self, orig_size: int) -> Block:
        """DeviceCachingAllocator::malloc: search the pool (get_free_block); else garbage-collect (when a memory
        fraction and garbage_collection_threshold are set), alloc_block, release_available_cached_blocks and
        retry, release_cached_blocks (empty the cache) and retry; else out of memory. Then should_split and
        alloc_found_block."""
        size = self.round_size(orig_size)
        pool = self.small if size <= SMALL_SIZE_BYTES else self.large  # get_pool
        alloc_size = self.allocation_size(size)
        block = self._get_free_block(pool, size)
        if block is None:
            if self.allowed_max_bytes is not None and self.conf.garbage_collection_threshold > 0:
                self._garbage_collect_cached_blocks()
            block = self._alloc_block(pool, size, alloc_size)
            if block is None and self._release_available_cached_blocks(pool, size):
                block = self._alloc_block(pool, size, alloc_size)
            if block is None:
                self.empty_cache()
                block = self._alloc_block(pool, size, alloc_size)
        if block is None:
            raise AllocatorOOM(alloc_size, self.allocated_bytes, self.reserved_bytes)
        return self._alloc_found_block(block, pool, size, orig_size, self._should_split(block, size))

    def free(self, block: Block) -> None:
        """DeviceCachingAllocator::free -> free_block (no other stream used the block)."""
        block.allocated = False
        self.allocated_bytes -= block.size
        del self.active[id(block)]
        self._free_block(block)

    def empty_cache(self) -> None:
        """release_cached_blocks: release_blocks of the large then the small pool."""
        for pool in (self.large, self.small):
            self._release_blocks(pool)

    def _get_free_block(self, pool: Pool, size: int) -> Block | None:
        """get_free_block: best fit, the smallest free block of >= size (ties: lowest address); in an expandable
        segment the size counts the unmapped range after the block (expandable_size). Oversize blocks
        (>= max_split_size) only serve requests >= max_split_size, and only within max_non_split_rounding."""
        if self.allowed_max_bytes is not None and self.conf.garbage_collection_threshold > 0:
            pool.get_free_blocks_call_count += 1
        i = pool.lower_bound(size)
        if i == len(pool):
            return None
        b = pool.at(i)
        if b.es is not None:
            if self.conf.expandable_segments:
                def expandable_size(x: Block) -> int:
                    return x.size + (x.next.size if x.next is not None and not x.next.mapped else 0)

                j = i + 1
                while b.es is not None and j < len(pool) and expandable_size(pool.at(j)) < expandable_size(b):
                    b = pool.at(j)
                    j += 1
            else:  # expandable segments switched off: only non-expandable blocks
                j = i + 1
                while j < len(pool) and pool.at(j).es is not None:
                    j += 1
                if j == len(pool):
                    return None
                b = pool.at(j)
        if size < self._max_split <= b.size:
            return None
        if size >= self._max_split and b.size >= size + self.conf.max_non_split_rounding_bytes:
            return None
        pool.remove(b)
        return b

    def _should_split(self, block: Block, size: int) -> bool:
        """should_split: small pool or expandable segments: a remainder of >= 512 B; large pool: only requests
        under max_split_size, and only a remainder of more than 1 MiB."""
        remaining = block.size - size
        if block.pool.is_small or self.conf.expandable_segments:
            return remaining >= MIN_BLOCK_BYTES
        return size < self._max_split and remaining > SMALL_SIZE_BYTES

    def _alloc_found_block(self, block: Block, pool: Pool, size: int, orig_size: int, split: bool) -> Block:
        """alloc_found_block: a split gives the request the block's start; the remainder goes back to the pool."""
        if split:
            remaining = block
            block = Block(size, remaining.addr, pool, es=remaining.es)
            block.prev = remaining.prev
            if block.prev is not None:
                block.prev.next = block
            block.next = remaining
            remaining.prev = block
            remaining.addr += size
            remaining.size -= size
            pool.insert(remaining)
        block.allocated, block.requested = True, orig_size
        self.active[id(block)] = block
        self.allocated_bytes += block.size
        if self.allocated_bytes > self.peak_allocated_bytes:
            self.peak_allocated_bytes = self.allocated_bytes
            self.reserved_at_peak_allocated_bytes = self.reserved_bytes
        return block

    def _free_block(self, block: Block) -> None:
        """free_block: merge with free neighbours of the same segment (try_merge_blocks), back into the pool."""
        for neighbour in (block.prev, block.next):
            self._try_merge_blocks(block, neighbour)
        block.pool.insert(block)

    def _try_merge_blocks(self, dst: Block, src: Block | None) -> int:
        """try_merge_blocks: only a free neighbour in the same mapped state; dst takes over its range."""
        if src is None or src.allocated or dst.mapped != src.mapped:
            return 0
        if dst.prev is src:
            dst.addr = src.addr
            dst.prev = src.prev
            if dst.prev is not None:
                dst.prev.next = dst
        else:
            dst.next = src.next
            if dst.next is not None:
                dst.next.prev = dst
        dst.size += src.size
        if src.mapped:
            src.pool.remove(src)
        else:
            src.pool.remove_unmapped(src)
        return src.size

    # --- device memory --------------------------------------------------------------------------------------
    def _new_address(self, size: int) -> int:
        if self.address_source is not None:
            return self.address_source(size)
        addr = self._next_addr
        self._next_addr += -(-size // ROUND_LARGE_BYTES) * ROUND_LARGE_BYTES
        return addr

    def _note_reserved(self) -> None:
        if self.reserved_bytes > self.peak_reserved_bytes:
            self.peak_reserved_bytes = self.reserved_bytes
            self.n_segments_at_peak = self.n_malloc_segments + self.n_mapped_runs

    def _alloc_block(self, pool: Pool, size: int, alloc_size: int) -> Block | None:
        """alloc_block: refused past the memory fraction's allowed maximum (alloc_size counts); with expandable
        segments, try_allocate_expandable_block maps just the pages `size` needs; else cudaMalloc(alloc_size)."""
        if self.allowed_max_bytes is not None and self.reserved_bytes + alloc_size > self.allowed_max_bytes:
            return None
        if self.conf.expandable_segments:
            return self._try_allocate_expandable_block(pool, size)
        if self.capacity_bytes is not None and self.reserved_bytes + alloc_size > self.capacity_bytes:
            return None
        block = Block(alloc_size, self._new_address(alloc_size), pool)
        self.reserved_bytes += alloc_size
        self.n_malloc_segments += 1
        self.log.append(("segment_alloc", block.addr, alloc_size))
        self._note_reserved()
        return block

    def _release_block(self, block: Block) -> None:
        """release_block: cudaFree of a whole unsplit, non-expandable cached segment."""
        assert block.es is None and not block.is_split()
        block.pool.remove(block)
        self.reserved_bytes -= block.size
        self.n_malloc_segments -= 1
        self.log.append(("segment_free", block.addr, block.size))

    def _release_available_cached_blocks(self, pool: Pool, size: int) -> bool:
        """release_available_cached_blocks (only with max_split_size): free the smallest oversize cached block
        that covers the request, else oversize blocks from the largest down until their sizes cover it."""
        if self.conf.max_split_size_bytes is None:
            return False
        key = max(size, self.conf.max_split_size_bytes)
        i = pool.lower_bound(key)
        if i == len(pool) or pool.at(i).es is not None:
            if i == 0:
                return False
            released = 0
            i -= 1
            while released < key and pool.at(i).size >= self.conf.max_split_size_bytes:
                cur, is_first = pool.at(i), i == 0
                if not is_first:
                    i -= 1
                if cur.es is None:
                    released += cur.size
                    self._release_block(cur)
                if is_first:
                    break
            return released >= key
        self._release_block(pool.at(i))
        return True

    def _release_blocks(self, pool: Pool) -> None:
        """release_blocks: free every unsplit cached segment; in expandable segments unmap every whole free page
        (unmap_block) and drop a segment left entirely unmapped (release_expandable_segment)."""
        to_unmap = []
        for b in pool.blocks():
            if b.es is not None:
                to_unmap.append(b)
            elif not b.is_split():
                self._release_block(b)
        for b in to_unmap:
            self._unmap_block(b)
            if not b.is_split() and not b.mapped:
                pool.remove_unmapped(b)
                self.segments_es.remove(b.es)

    def _garbage_collect_cached_blocks(self) -> None:
        """garbage_collect_cached_blocks: above threshold x allowed maximum, free unsplit large-pool cached
        segments whose age (get_free_block calls since cached) is at least the mean age, until enough."""
        threshold = int(self.conf.garbage_collection_threshold * self.allowed_max_bytes)
        if self.reserved_bytes <= threshold:
            return
        target, reclaimed = self.reserved_bytes - threshold, 0
        pool = self.large

        def age(b: Block) -> int:
            return pool.get_free_blocks_call_count - b.gc_count_base

        freeable = [b for b in pool.blocks() if not b.is_split()]
        total_age, count = sum(age(b) for b in freeable), len(freeable)
        freed = True
        while reclaimed < target and freed and count > 0:
            threshold_age = total_age / count
            freed = False
            for b in pool.blocks():
                if not b.is_split() and b.es is None and age(b) >= threshold_age:
                    freed = True
                    reclaimed += b.size
                    total_age -= age(b)
                    count -= 1
                    self._release_block(b)

    # --- expandable segments ----------------------------------------------------------------------------------
    def _try_allocate_expandable_block(self, pool: Pool, size: int) -> Block | None:
        """try_allocate_expandable_block: from the lowest-address candidate (find_expandable_block) map pages
        until the free range reaches `size` (map_block merges each with the free block before it)."""
        c = self._find_expandable_block(pool, size)
        if not c.mapped and not self._map_block(c, min(c.size, size)):
            return None
        while c.size < size:
            nxt = c.next
            if not self._map_block(nxt, min(size - c.size, nxt.size)):
                return None
            c = nxt
        pool.remove(c)
        return c

    def _find_expandable_block(self, pool: Pool, size: int) -> Block:
        """find_expandable_block: the lowest unmapped range (with the free block right before it) that has room;
        else a new segment reserving address space for 9/8 of the GPU's memory."""
        def allocatable(b: Block | None) -> bool:
            return b is not None and not b.allocated

        for c in pool.unmapped():
            if allocatable(c.prev):
                c = c.prev
            room, b = 0, c
            while room < size and allocatable(b):
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = SMALL_BUFFER_BYTES if pool.is_small else self.conf.large_segment_size_bytes
        total = self.total_memory_bytes or self.capacity_bytes
        space = total + total // 8 if total is not None else DEFAULT_ADDRESS_SPACE_BYTES
        n_pages = -(-space // page)
        self._next_addr = -(-self._next_addr // page) * page
        es = ExpandableSegment(self._next_addr, page, n_pages)
        self._next_addr += es.size
        self.segments_es.append(es)
        candidate = Block(es.size, es.base, pool, es=es, mapped=False)
        pool.add_unmapped(candidate)
        return candidate

    def _map_block(self, to_map: Block, size: int) -> bool:
        """map_block: map the pages covering `size` from the start of an unmapped range (all or nothing, as
        ExpandableSegment::map releases what it created when cuMemCreate fails); the rest stays unmapped."""
        es = to_map.es
        first = (to_map.addr - es.base) // es.page_bytes
        last = -(-(to_map.addr + size - es.base) // es.page_bytes)
        mapped = (last - first) * es.page_bytes
        if mapped == 0 or (self.capacity_bytes is not None and self.reserved_bytes + mapped > self.capacity_bytes):
            return False
        pool = to_map.pool
        pool.remove_unmapped(to_map)
        to_map.mapped = True
        if mapped < to_map.size:
            rest = Block(to_map.size - mapped, to_map.addr + mapped, pool, es=es, mapped=False)
            rest.splice(to_map, to_map.next)
            pool.add_unmapped(rest)
            to_map.size = mapped
        self._try_merge_blocks(to_map, to_map.prev)
        self._try_merge_blocks(to_map, to_map.next)
        pool.insert(to_map)
        self.n_mapped_runs += es.runs_delta(first, last, mapping=True)
        es.mapped[first:last] = b"\x01" * (last - first)
        self.reserved_bytes += mapped
        self.log.append(("segment_map", es.base + first * es.page_bytes, mapped))
        self._note_reserved()
        return True

    def _unmap_block(self, block: Block) -> None:
        """unmap_block: unmap the whole pages inside a free block; the partial pages either side stay mapped as
        free blocks; the unmapped range merges with unmapped neighbours."""
        es, pool = block.es, block.pool
        first = -(-(block.addr - es.base) // es.page_bytes)
        last = (block.addr + block.size - es.base) // es.page_bytes
        if first >= last:
            return
        pool.remove(block)
        start, size = es.base + first * es.page_bytes, (last - first) * es.page_bytes
        before = start - block.addr
        if before > 0:
            b = Block(before, block.addr, pool, es=es)
            b.splice(block.prev, block)
            pool.insert(b)
        after = block.size - before - size
        if after > 0:
            a = Block(after, start + size, pool, es=es)
            a.splice(block, block.next)
            pool.insert(a)
        block.addr, block.size, block.mapped = start, size, False
        self._try_merge_blocks(block, block.prev)
        self._try_merge_blocks(block, block.next)
        pool.add_unmapped(block)
        self.n_mapped_runs += es.runs_delta(first, last, mapping=False)
        es.mapped[first:last] = bytes(last - first)
        self.reserved_bytes -= size
        self.log.append(("segment_unmap", start, size))

    # --- inspection -------------------------------------------------------------------------------------------
    def segments(self) -> list[dict]:
        """What snapshot() lists: one segment per cudaMalloc and per contiguous mapped range of an expandable
        segment, in address order, with its blocks (size, allocated)."""
        all_blocks = [*self.small.blocks(), *self.large.blocks(), *self.active.values()]
        out = []
        for head in all_blocks:
            if head.prev is not None and head.prev.mapped:
                continue
            blocks, b = [], head
            while b is not None and b.mapped:
                blocks.append((b.size, b.allocated))
                b = b.next
            out.append({"address": head.addr, "total_size": sum(s for s, _ in blocks), "pool":
                        "small" if head.pool.is_small else "large", "expandable": head.es is not None,
                        "blocks": blocks})
        return sorted(out, key=lambda s: s["address"])


def roundup_power2_next_division(size: int, divisions: int) -> int:
    """roundup_power2_next_division: the next of `divisions` equal steps between the powers of 2 around size
    (1200 with 4 divisions -> 1280)."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def simulate(events, *, conf: AllocConf | str | None = None, capacity_bytes: int | None = None,
             total_memory_bytes: int | None = None, address_source=None) -> tuple[SimResult, CachingAllocator]:
    """Replay `events` in order: an int n > 0 allocates n bytes (the k-th allocation, counting from 0), -(k+1)
    frees the k-th allocation. At the first allocation that finds no memory, the OOM is recorded and the
    simulation goes on without the capacity limit, so the peaks of the whole stream are still reported."""
    if not isinstance(conf, AllocConf):
        conf = parse_alloc_conf(conf)
    alloc = CachingAllocator(conf, capacity_bytes, total_memory_bytes, address_source)
    blocks: list[Block | None] = []
    oom = None
    for i, e in enumerate(events):
        if e > 0:
            try:
                blocks.append(alloc.malloc(e))
            except AllocatorOOM as err:
                if oom is None:
                    oom = {"event": i, "request_bytes": err.request_bytes, "allocated_bytes": err.allocated_bytes,
                           "reserved_bytes": err.reserved_bytes}
                alloc.capacity_bytes = alloc.allowed_max_bytes = None
                blocks.append(alloc.malloc(e))
        else:
            block = blocks[-e - 1]
            if block is not None:
                alloc.free(block)
                blocks[-e - 1] = None
    result = SimResult(alloc.peak_reserved_bytes, alloc.peak_allocated_bytes, alloc.reserved_at_peak_allocated_bytes,
                       alloc.n_segments_at_peak, oom)
    return result, alloc

