"""Which ops of a TFLite graph ran outside the XNNPACK delegate (:meth:`TFLiteEngine.delegation`).

The LiteRT interpreter lists every original node plus one ``DELEGATE`` node per
partition the delegate took. A partition's original nodes are found by walking
back from each DELEGATE node's output tensors to the tensors it takes as input;
every original node not reached that way runs on the interpreter's own kernels.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, Iterable, List, Set


def nodes_outside_delegates(ops: Iterable[dict]) -> List[dict]:
    """Original nodes not covered by any DELEGATE node, in graph order.

    ``ops`` is ``Interpreter._get_ops_details()`` (dicts with index, op_name, inputs, outputs).
    """
    ops = list(ops)
    originals = [o for o in ops if o["op_name"] != "DELEGATE"]
    delegates = [o for o in ops if o["op_name"] == "DELEGATE"]
    producer = {}
    for o in originals:
        for t in o["outputs"]:
            producer[int(t)] = o
    covered: Set[int] = set()
    for d in delegates:
        boundary = {int(t) for t in d["inputs"]}
        stack = [int(t) for t in d["outputs"]]
        seen: Set[int] = set()
        while stack:
            t = stack.pop()
            if t in seen or t in boundary:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None or node["index"] in covered:
                continue
            covered.add(node["index"])
            stack.extend(int(i) for i in node["inputs"] if int(i) >= 0)
    return [o for o in originals if o["index"] not in covered]


def delegation_summary(ops: Iterable[dict]) -> Dict[str, object]:
    """Counts: nodes, delegate partitions, and per-op-type counts of nodes outside the delegate."""
    ops = list(ops)
    outside = nodes_outside_delegates(ops)
    originals = [o for o in ops if o["op_name"] != "DELEGATE"]
    return {
        "nodes": len(originals),
        "partitions": sum(1 for o in ops if o["op_name"] == "DELEGATE"),
        "nodes_outside": len(outside),
        "ops_outside": dict(sorted(Counter(o["op_name"] for o in outside).items())),
        "op_counts": dict(sorted(Counter(o["op_name"] for o in originals).items())),
    }
