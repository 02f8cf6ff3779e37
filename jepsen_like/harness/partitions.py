"""Partition shapes as pure functions: which directed links a fault cuts.

A directed link ``(a, b)`` is node ``a``'s connection to node ``b``: a's
requests to b and b's replies to a travel on it (kvsvr nodes open one TCP
connection per peer). Cutting ``(a, b)`` means a can no longer use b; b can
still use a over ``(b, a)`` unless that is cut too. Every function returns the
set of cut links; the proxies do the cutting.

Node lists are taken as given (the caller shuffles them with its seeded random
when it wants a random shape), so the same input always gives the same cut.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Link = tuple[str, str]
Cut = frozenset[Link]

SHAPES = ("isolate", "majority-minority", "majorities-ring", "bridge")


def majority(node_count: int) -> int:
    """The smallest number of nodes that is more than half of `node_count`."""
    return node_count // 2 + 1


def all_links(nodes: Sequence[str]) -> Cut:
    """Every directed link between distinct nodes."""
    return frozenset((a, b) for a in nodes for b in nodes if a != b)


def cut_between(groups: Iterable[Iterable[str]]) -> Cut:
    """Both directions of every link joining nodes of different groups."""
    group_list = [frozenset(group) for group in groups]
    cut: set[Link] = set()
    for index, group in enumerate(group_list):
        for other in group_list[index + 1 :]:
            for a in group:
                for b in other:
                    cut.add((a, b))
                    cut.add((b, a))
    return frozenset(cut)


def isolate(nodes: Sequence[str], node: str) -> Cut:
    """`node` loses every link to and from the others, who still see each other."""
    if node not in nodes:
        raise ValueError(f"{node!r} is not one of {list(nodes)}")
    return cut_between([[node], [n for n in nodes if n != node]])


def majority_minority(nodes: Sequence[str]) -> Cut:
    """The first ``len(nodes) // 2`` nodes (a minority) split from the rest."""
    if len(nodes) < 2:
        raise ValueError("a split needs at least two nodes")
    minority_size = len(nodes) // 2
    return cut_between([nodes[:minority_size], nodes[minority_size:]])


def majorities_ring(nodes: Sequence[str]) -> Cut:
    """Every node sees a majority (itself included), no two nodes the same one.

    The nodes sit on a ring in the given order; each sees the window of a
    majority of consecutive nodes around itself. With 5 nodes each sees its
    two neighbours (a symmetric cut); with 3 a majority is 2, so each node
    sees itself and its successor, and the cut is one-way (a uses b, b uses c,
    c uses a), which only a connection-level proxy can express.
    """
    count = len(nodes)
    if count < 3:
        raise ValueError("a majorities ring needs at least three nodes")
    window = majority(count)
    behind = (window - 1) // 2
    cut: set[Link] = set()
    for position, node in enumerate(nodes):
        seen = {nodes[(position - behind + step) % count] for step in range(window)}
        cut.update((node, other) for other in nodes if other not in seen)
    return frozenset(cut)


def bridge(nodes: Sequence[str]) -> Cut:
    """Two halves joined only through the middle node of the given order.

    With 5 nodes: {a, b} - c - {d, e}; with 3: {a} - b - {c}. Every node sees
    a majority, but the two halves cannot see each other.
    """
    count = len(nodes)
    if count < 3:
        raise ValueError("a bridge needs at least three nodes")
    middle = count // 2
    return cut_between([nodes[:middle], nodes[middle + 1 :]])


def shape_cut(shape: str, nodes: Sequence[str]) -> Cut:
    """The cut of a named shape over `nodes` in the given order (isolate: the first)."""
    if shape == "isolate":
        return isolate(nodes, nodes[0])
    if shape == "majority-minority":
        return majority_minority(nodes)
    if shape == "majorities-ring":
        return majorities_ring(nodes)
    if shape == "bridge":
        return bridge(nodes)
    raise ValueError(f"unknown partition shape {shape!r}; expected one of {SHAPES}")


def reachable(nodes: Sequence[str], cut: Cut, node: str) -> frozenset[str]:
    """The nodes `node` can use directly (itself included) under `cut`."""
    return frozenset(other for other in nodes if other == node or (node, other) not in cut)


def describe_cut(nodes: Sequence[str], cut: Cut) -> dict[str, list[str]]:
    """For each node, the peers it can use: what the history records."""
    return {node: sorted(reachable(nodes, cut, node) - {node}) for node in nodes}
