"""KV page pool and radix prefix cache.

Pages are reference counted: each running request holds a reference on every page of its
page table, and the prefix tree holds one on every page it indexes. A page returns to the
free list when its count reaches zero. Page 0 is reserved (CUDA-graph padding writes there).

The prefix cache is a radix tree at page granularity (SGLang's design with page_size > 1):
an edge is the token ids of one full page, a node owns that page's KV. A new request walks
the tree along its prompt and reuses the matched pages; finished (and running) requests add
their full pages. When the pool runs dry, leaves that no request uses are evicted, least
recently used first.

Requests of a LoRA adapter (engine/lora.py) compute other K / V from the same tokens: their pages live under
their own first-page keys (the adapter id joined to the first page's tokens), so the tree never hands one
adapter's pages to another, or to a request without one.
"""
from __future__ import annotations

import heapq
import itertools

import numpy as np


class OutOfPages(Exception):
    pass


class PagePool:
    def __init__(self, num_pages: int, page_size: int, reserved: int = 1):
        if num_pages <= reserved:
            raise ValueError(f"the KV cache needs more than {reserved} pages, got {num_pages}")
        self.num_pages, self.page_size, self.reserved = num_pages, page_size, reserved
        self.refs = np.zeros(num_pages, dtype=np.int32)
        self.free_list = list(range(num_pages - 1, reserved - 1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self.free_list)

    @property
    def usable(self) -> int:
        return self.num_pages - self.reserved

    def alloc(self, n: int) -> list[int]:
        if n > len(self.free_list):
            raise OutOfPages(n)
        pages = [self.free_list.pop() for _ in range(n)]
        self.refs[pages] = 1
        return pages

    def ref(self, pages) -> None:
        for p in pages:
            self.refs[p] += 1

    def unref(self, pages) -> None:
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free_list.append(p)
            elif self.refs[p] < 0:
                raise AssertionError(f"page {p} released more often than taken")


class _Node:
    __slots__ = ("key", "page", "children", "parent", "last_access")

    def __init__(self, key, page, parent):
        self.key, self.page, self.parent = key, page, parent
        self.children: dict[tuple, _Node] = {}
        self.last_access = 0


class PrefixCache:
    def __init__(self, pool: PagePool):
        self.pool = pool
        self.root = _Node((), -1, None)
        self.clock = itertools.count(1)
        self.num_nodes = 0
        self.query_tokens = 0
        self.hit_tokens = 0

    def _key(self, tokens, i: int, namespace: int):
        """Page i's edge key: its tokens, the first page's joined to a LoRA adapter's id (namespace > 0)."""
        ps = self.pool.page_size
        key = tuple(tokens[i * ps:(i + 1) * ps])
        return (("lora", namespace),) + key if namespace and i == 0 else key

    def match(self, tokens, max_pages: int | None = None, namespace: int = 0) -> tuple[list[int], _Node]:
        """Longest cached run of full pages at the start of tokens: (pages, last node). The caller
        takes its own references on the pages (PagePool.ref). namespace: the requests' LoRA adapter id (0: none)."""
        n = len(tokens) // self.pool.page_size
        if max_pages is not None:
            n = min(n, max_pages)
        node, pages, now = self.root, [], next(self.clock)
        for key in (self._key(tokens, i, namespace) for i in range(n)):
            child = node.children.get(key)
            if child is None:
                break
            child.last_access = now
            pages.append(child.page)
            node = child
        return pages, node

    def record_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.query_tokens += query_tokens
        self.hit_tokens += hit_tokens

    def insert(self, node: _Node, tokens, pages, start_page: int, end_page: int, namespace: int = 0) -> _Node:
        """Index full pages start_page..end_page-1 of a request (tokens / pages: the request's),
        continuing from ``node`` (the tree node of page start_page-1). Returns the new last node.
        A page whose content is already indexed (another request computed it too) stays private.
        namespace: the request's LoRA adapter id (0: none), as match() takes it."""
        now = next(self.clock)
        for i in range(start_page, end_page):
            key = self._key(tokens, i, namespace)
            child = node.children.get(key)
            if child is None:
                child = _Node(key, pages[i], node)
                node.children[key] = child
                self.pool.ref([pages[i]])
                self.num_nodes += 1
            child.last_access = now
            node = child
        return node

    def evict(self, n_pages: int) -> int:
        """Free up to n_pages pages held only by the tree, least recently used leaves first."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves() if self.pool.refs[leaf.page] == 1]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < n_pages:
            _, _, leaf = heapq.heappop(heap)
            parent = leaf.parent
            del parent.children[leaf.key]
            self.num_nodes -= 1
            self.pool.unref([leaf.page])
            freed += 1
            if parent is not self.root and not parent.children and self.pool.refs[parent.page] == 1:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def evictable(self) -> int:
        """Pages the tree alone holds (an upper bound of what evict() can free)."""
        return sum(1 for n in self._nodes() if self.pool.refs[n.page] == 1)

    def _nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def _leaves(self):
        return (n for n in self._nodes() if not n.children)

    def reset(self) -> None:
        for n in list(self._nodes()):
            self.pool.unref([n.page])
        self.root.children.clear()
        self.num_nodes = 0
