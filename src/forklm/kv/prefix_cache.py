"""Token prefixes -> their K/V, as a radix tree of reference-counted nodes (SGLang's radix cache).

Each node holds the K/V of a run of tokens (a `Segment`) that follows its parent's; a running
request pins every node on its path (`lock`), and only unpinned leaves are evicted, least recently
used first, so nothing in use is ever freed. Matching is per token; a match that ends inside a node
splits it, so every request's prompt ends on a node boundary and the shared part of any two paths
is the same nodes (read once per decode step by every row below them).

A node being prefilled is `pending`: a request whose prompt reaches into it waits for it rather
than computing the same K/V again. A node whose last token ended a prompt keeps that position's
next-token logits, so a later request with exactly that prompt needs no model call at all.
With caching off, nodes are private to their request: never matched, freed when it finishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .storage import KVStorage, Segment


class Node:
    def __init__(self, parent: Node | None, tokens: list[int], segment: Segment | None, start: int):
        self.parent, self.tokens, self.segment, self.start = parent, list(tokens), segment, start
        self.children: dict[int, Node] = {}
        self.ref = 0  # running requests whose path holds this node
        self.last_used = 0
        self.logits: Tensor | None = None  # [V] after the last token, when that ended a prompt
        self.pending = False  # K/V still being prefilled
        self.private = False  # not in the tree (prefix caching off for its request)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    def path(self) -> list[Node]:
        """The nodes from the top of the tree down to this one (the root excluded)."""
        nodes, node = [], self
        while node is not None and node.parent is not None:
            nodes.append(node)
            node = node.parent
        return nodes[::-1]


@dataclass
class Match:
    node: Node  # the deepest node whose tokens all match
    length: int  # prompt tokens covered by the path to `node`
    partial: tuple[Node, int] | None = None  # (child, k): the next k tokens match inside child
    blocked: bool = False  # the prompt reaches into a node that is still being prefilled


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    def __init__(self, storage: KVStorage, enabled: bool = True):
        self.storage, self.enabled = storage, enabled
        self.root = Node(None, [], None, 0)
        self._clock = 0
        self.hit_tokens = 0  # prompt tokens whose K/V was reused (counted by the scheduler)
        self.evictions = 0  # nodes evicted
        self.evicted_tokens = 0

    # ---- lookup -----------------------------------------------------------------------------------
    def match(self, tokens: list[int], start: Node | None = None) -> Match:
        node, i = start or self.root, 0
        if not self.enabled:
            return Match(node, 0)
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            if child.pending:
                return Match(node, i, blocked=True)
            k = _common(child.tokens, tokens[i:])
            if k < len(child.tokens):
                return Match(node, i, partial=(child, k))
            node, i = child, i + k
        return Match(node, i)

    def split(self, node: Node, k: int) -> Node:
        """Cut `node` after its first k tokens; returns the new upper node (the node keeps the rest,
        its children, its logits and its identity, so the paths of requests holding it stay right)."""
        assert 0 < k < len(node.tokens) and not node.pending
        kv = node.segment.kv
        upper = Node(node.parent, node.tokens[:k], None, node.start)
        upper.private, upper.ref, upper.last_used = node.private, node.ref, node.last_used
        self.storage.free(node.segment)
        upper.segment = self.storage.adopt(kv[:, :, :, :k].clone())
        node.segment = self.storage.adopt(kv[:, :, :, k:].clone())
        if not node.private:
            node.parent.children[node.tokens[0]] = upper
        node.tokens, node.start, node.parent = node.tokens[k:], node.start + k, upper
        upper.children[node.tokens[0]] = node
        return upper

    def insert(self, parent: Node, tokens: list[int], segment: Segment, pending: bool = False,
               private: bool = False) -> Node:
        """A new child of `parent` holding `tokens` (whose first token no child of parent starts with);
        a private one is linked to its parent but never found by `match`."""
        node = Node(parent, tokens, segment, parent.end)
        node.pending = pending
        node.private = private or not self.enabled or parent.private
        if not node.private:
            assert tokens[0] not in parent.children
            parent.children[tokens[0]] = node
        return node

    def extend(self, node: Node, tokens: list[int], kv: Tensor) -> None:
        """Cache `tokens` (with their K/V kv [layers, 2, Hkv, len, D], any strides: a view of the pool or of
        a segment) as a continuation of `node`: the part already in the tree is shared, the rest is copied
        into a new leaf if the budget holds it (after evicting unpinned leaves). Nothing happens for a
        private node or a pending path."""
        if not self.enabled or node.private or not tokens:
            return
        m = self.match(tokens, start=node)
        if m.blocked:
            return
        parent, done = m.node, m.length
        if m.partial is not None:
            parent, done = self.split(*m.partial), done + m.partial[1]
        rest = tokens[done:]
        if not rest:
            return
        self.evict(len(rest) - self.storage.free_tokens, protect=parent)
        segment = self.storage.adopt(kv[:, :, :, done:].clone(memory_format=torch.contiguous_format))  # one copy
        if segment is not None:
            self.insert(parent, rest, segment).last_used = self._tick()

    # ---- pins -------------------------------------------------------------------------------------
    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def lock(self, node: Node) -> None:
        now = self._tick()
        for n in node.path():
            n.ref += 1
            n.last_used = now

    def unlock(self, node: Node) -> None:
        now = self._tick()
        for n in reversed(node.path()):
            n.ref -= 1
            n.last_used = now
            assert n.ref >= 0
            if n.ref == 0 and (n.private or n.pending):  # a request's own node, or an abandoned prefill
                self._remove(n)

    # ---- eviction ---------------------------------------------------------------------------------
    def _remove(self, node: Node) -> None:
        if node.segment is not None:
            self.storage.free(node.segment)
            node.segment = None
        if not node.private and node.parent is not None and node.parent.children.get(node.tokens[0]) is node:
            del node.parent.children[node.tokens[0]]
        for child in list(node.children.values()):  # only an abandoned pending node can have any
            self._remove(child)

    def evict(self, tokens: int, protect: Node | None = None) -> int:
        """Free `tokens` of the budget: first the idle room after unpinned nodes' K/V, then unpinned leaves,
        least recently used first; returns how many were freed. Never touches a node with ref > 0, a
        pending node, or `protect` and its path."""
        if tokens <= 0:
            return 0
        keep = set(map(id, protect.path())) if protect is not None else set()
        freed = self._trim_rooms(tokens, keep)
        leaves = [n for n in self.nodes() if not n.children and n.ref == 0 and not n.pending and id(n) not in keep]
        leaves.sort(key=lambda n: n.last_used)
        while freed < tokens and leaves:
            leaf = leaves.pop(0)
            parent = leaf.parent
            freed += len(leaf.tokens)
            self.evictions += 1
            self.evicted_tokens += len(leaf.tokens)
            self._remove(leaf)
            if parent is not self.root and not parent.children and parent.ref == 0 and id(parent) not in keep:
                leaves.append(parent)
                leaves.sort(key=lambda n: n.last_used)
        return freed

    def _trim_rooms(self, tokens: int, keep: set[int]) -> int:
        """Cut unpinned nodes' segments back to their tokens (the room a finished request's samples left
        after a prompt), least recently used first, until `tokens` are freed; returns how many were."""
        freed = 0
        roomy = [n for n in self.nodes() if n.ref == 0 and not n.pending and id(n) not in keep
                 and n.segment.capacity > len(n.tokens)]
        for node in sorted(roomy, key=lambda n: n.last_used):
            if freed >= tokens:
                break
            old, t = node.segment, len(node.tokens)
            freed += old.capacity - t
            kv = old.kv[:, :, :, :t].clone()  # [layers, 2, Hkv, t, D]
            self.storage.free(old)
            node.segment = self.storage.adopt(kv)  # fits: the old segment held more
        return freed

    # ---- accounting -------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        out, todo = [], list(self.root.children.values())
        while todo:
            n = todo.pop()
            out.append(n)
            todo.extend(n.children.values())
        return out

    def cached_tokens(self) -> int:
        return sum(len(n.tokens) for n in self.nodes())

    def room_tokens(self) -> int:
        """Slots allocated after cached nodes' tokens (room for samples after a prompt), in use or idle."""
        return sum(n.segment.capacity - len(n.tokens) for n in self.nodes())

    def total_refs(self) -> int:
        return sum(n.ref for n in self.nodes())

    def invalidate(self) -> None:
        """Forget every cached prefix (the weights changed): unpinned nodes are freed now; pinned ones
        leave the tree, private to the requests running on them, and are freed when those finish. No
        request admitted later matches K/V computed before."""
        self.clear()
        for node in self.nodes():
            node.private = True
        self.root.children = {}

    def clear(self) -> None:
        """Drop every unpinned node (the weights changed, or the engine is being resized)."""
        self.evict(self.cached_tokens() + self.room_tokens() + 1)


def store_logits(node: Node, logits: Tensor) -> None:
    """Keep the next-token logits [V] after `node` (the end of a prompt) for later identical prompts."""
    node.logits = logits.detach().to(torch.float32).clone()
