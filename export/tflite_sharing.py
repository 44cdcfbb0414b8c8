"""One run of a TFLite network for both I/O signatures of a precision, in the export's parity gate (issue 17).

The ``image`` file of a precision is the ``tensor`` file's network behind a few ops of its own (the input casts,
the normalisation, the hole's binarisation, the composite, clamp and rounding: :mod:`export.wrappers`). Inside
:func:`session` (the export's TFLite gate session, :func:`export.tflite.gate_session`):

* every inference of a ``tensor`` file keeps the digest of what it was fed and its outputs (:class:`Kept`; the
  files of one shape, the last :data:`KEPT_FILES` of them);
* a later file whose graph holds a kept file's network -- the same ops, options, constants and quantization
  parameters, fed by corresponding tensors (:func:`export.tflite_graph.embedding` with ``quantization=True``) --
  runs each sample as two small models of its own ops (:func:`export.tflite_graph.cut`): the first computes the
  values standing in the network's inputs' places; where their bytes are a kept inference's feed, the second
  takes that inference's outputs in the network's place and computes the file's output;
* the first sample so served runs in the whole file too, and the two outputs must be the same bytes, or every
  sample of the file runs in the whole file (:attr:`Served.mismatch` says so). That inference also records what
  LiteRT ran outside XNNPACK, for the manifest's op inventory.

The same ops of one runtime on the same bytes give the same bytes: the ``tensor`` samples hold ``x * (1/127.5) - 1``
(:func:`runtime_py.contract.normalize`), the value the ``image`` graph computes in the network's input place.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from . import tflite_graph as g

#: The kept files, most recent last; a file of another input shape clears them (the gate runs one shape's files,
#: then the next's). Four: a shape's pure ``tensor`` files (fp32, fp16, int8-dynamic, int8) are gated before their
#: ``image`` twins, and each fallback candidate right before its twin.
KEPT_FILES = 4

_KEPT: Optional[List["Kept"]] = None  # None outside a session


def feed_digest(arrays: Sequence[np.ndarray]) -> str:
    """The sha256 of arrays in order: dtype, shape and bytes of each."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class Kept:
    """A file's inferences in the session: its graph, its input names in graph order, and the outputs of each
    inference (by output name) by the digest of its feed (:func:`feed_digest`, inputs in graph order)."""

    identity: tuple
    model: object
    inputs: List[str]
    input_shapes: List[Tuple[int, ...]]
    runs: Dict[str, Dict[str, np.ndarray]] = field(default_factory=dict)


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The block in which :func:`wrap` keeps and serves; nothing is kept outside it, and all of it goes at its end."""
    global _KEPT
    before, _KEPT = _KEPT, []
    try:
        yield
    finally:
        _KEPT = before


def _input_names(model) -> List[str]:
    sg = model.subgraphs[0]
    return [g.tensor_name(sg.tensors[t]) for t in g._ids(sg.inputs)]


def _output_names(model) -> List[str]:
    sg = model.subgraphs[0]
    return [g.tensor_name(sg.tensors[t]) for t in g._ids(sg.outputs)]


class _Wrapped:
    """An engine behind :func:`wrap`: the attributes ``export.parity.run_samples`` and ``export.tflite.run`` read
    are the wrapped engine's unless overridden."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def __enter__(self):
        self._engine.__enter__()
        return self

    def __exit__(self, *exc):
        return self._engine.__exit__(*exc)

    def note(self) -> str:
        return ""


class Keeping(_Wrapped):
    """A ``tensor`` file's engine whose inferences are kept for the session (:class:`Kept`)."""

    def __init__(self, engine, kept: Kept):
        super().__init__(engine)
        self.kept = kept

    def infer(self, feed, check: bool = True):
        out = self._engine.infer(feed, check)
        self.kept.runs[feed_digest([feed[n] for n in self.kept.inputs])] = out
        return out


@dataclass
class Plan:
    """How a file's own ops run around a kept file's network: ``pre`` (the file's inputs -> the values standing in
    the network's inputs, in the kept file's input order), ``post`` (the file's inputs and the network's outputs in
    their places -> the file's outputs), and which ``post`` input takes which of the kept file's outputs."""

    source: Kept
    pre: bytes
    pre_outputs: List[str]
    post: bytes
    post_fed: Dict[str, str]
    outputs: List[str]


def plan_for(model, source: Kept) -> Optional[Plan]:
    """The :class:`Plan` for the file ``model`` (a ``ModelT``) around ``source``'s network, or None where its graph
    does not compute that network bit for bit or its own ops read more of the network than the network's outputs
    (or constants the network dequantizes, which the cuts compute themselves)."""
    inner = source.model
    where = g.embedding(inner, model, quantization=True)
    if where is None:
        return None
    sg, isg = model.subgraphs[0], inner.subgraphs[0]
    inner_inputs = g._ids(isg.inputs)
    network, _, own = g.around_embedding(inner, model, where)
    network_ops = set(range(len(sg.operators))) - set(own)
    reads = {t for i in own for t in g._ids(sg.operators[i].inputs)}
    # network ops of constants alone (a float16 file's DEQUANTIZE of a constant the own ops read too) go with them
    from_constants = {i for i in network_ops
                      if set(g._ids(sg.operators[i].outputs)) & reads
                      and all(t < 0 or g._is_constant(model, sg.tensors[t]) for t in g._ids(sg.operators[i].inputs))}
    own_ops = sorted(set(own) | from_constants)
    made = {t for i in own_ops for t in g._ids(sg.operators[i].outputs)}
    inputs = g._ids(sg.inputs)
    fed = sorted({t for i in own_ops for t in g._ids(sg.operators[i].inputs) if t in network and t not in made})
    of = {b: a for a, b in where.items()}
    inner_outputs = dict(zip(g._ids(isg.outputs), _output_names(inner)))
    if any(of[t] not in inner_outputs for t in fed):
        return None
    standing_in = [where[a] for a in inner_inputs]
    needed, pre_ops = set(standing_in), set()
    for i in reversed(own_ops):
        if needed & set(g._ids(sg.operators[i].outputs)):
            pre_ops.add(i)
            needed |= {t for t in g._ids(sg.operators[i].inputs) if t >= 0}
    if any(t in network and t not in made for t in needed):
        return None
    pre = g.cut_model(model, sorted(pre_ops), inputs)
    pre.subgraphs[0].outputs = list(standing_in)
    post = g.cut_model(model, own_ops, inputs + fed)
    post.subgraphs[0].outputs = g._ids(sg.outputs)
    return Plan(source=source, pre=g.write(pre), pre_outputs=[g.tensor_name(sg.tensors[t]) for t in standing_in],
                post=g.write(post), post_fed={g.tensor_name(sg.tensors[t]): inner_outputs[of[t]] for t in fed},
                outputs=_output_names(model))


class Served(_Wrapped):
    """A file's engine whose samples a kept file's inferences serve (module docstring). ``make_feed`` and
    ``output_specs`` come from ``specs`` (the file without XNNPACK: no weights packed); the whole file's engine is
    activated only for a sample no kept inference serves, and for the first one served (the check)."""

    def __init__(self, engine, specs, plan: Plan, make_cut):
        super().__init__(engine)
        self._specs = specs
        self.plan = plan
        self._pre = make_cut(plan.pre)
        self._post = make_cut(plan.post)
        self.served = 0  # samples whose output came from the cut and a kept inference alone
        self.checked = False  # the first servable sample ran in both ways with the same bytes
        self.mismatch: Optional[str] = None  # why serving stopped after the check, if it did

    def __enter__(self):
        self._specs.activate()
        return self

    def __exit__(self, *exc):
        for e in (self._pre, self._post, self._engine, self._specs):
            e.deactivate()

    def make_feed(self, image, hole):
        return self._specs.make_feed(image, hole)

    def input_specs(self):
        return self._specs.input_specs()

    def output_specs(self):
        return self._specs.output_specs()

    def infer(self, feed, check: bool = True):
        if self.mismatch is not None:
            return self._engine.infer(feed, check)
        pre = self._pre.infer({n: feed[n] for n in self._pre_inputs()}, check)
        kept = self.plan.source.runs.get(feed_digest([pre[n] for n in self.plan.pre_outputs]))
        if kept is None:
            return self._engine.infer(feed, check)
        post_feed = {n: feed[n] for n in self._post_inputs() if n not in self.plan.post_fed}
        post_feed.update({n: kept[source] for n, source in self.plan.post_fed.items()})
        cut_out = self._post.infer(post_feed, check)
        names = [s.name for s in self.output_specs()]
        derived = {name: cut_out[o] for name, o in zip(names, self.plan.outputs)}
        if not self.checked:
            whole = self._engine.infer(feed, check)
            self.checked = True
            differing = {k: int(np.count_nonzero(np.asarray(whole[k]) != np.asarray(derived[k]))) for k in names}
            if any(differing.values()):
                self.mismatch = f"{sum(differing.values())} values of the first sample differ from the whole file's"
            return whole
        self.served += 1
        return derived

    def _pre_inputs(self) -> List[str]:
        return [s.name for s in self._pre.activate().input_specs()]

    def _post_inputs(self) -> List[str]:
        return [s.name for s in self._post.activate().input_specs()]

    def note(self) -> str:
        if self.mismatch is not None:
            return f"; not served by the network's earlier run: {self.mismatch}"
        if not self.served:
            return ""
        return (f"; network of {self.served} samples from the run of an identical network on the same input bytes "
                f"(the first sample run in the whole file too: the same bytes)")


def wrap(engine, path, io: str, identity: tuple, make_specs, make_cut):
    """``engine`` (of the file at ``path``, signature ``io``; ``identity`` tells its runs apart from another file's,
    ``export.tflite._file_identity``) as the session has it run: unchanged outside a
    :func:`session`; :class:`Keeping` for a ``tensor`` file; :class:`Served` for a file that holds a kept file's
    network (:func:`plan_for`), else unchanged. ``make_specs()``: an engine of the file for its specs alone;
    ``make_cut(model_bytes)``: an engine of a cut model, as the file's own ops run. Always an engine with
    :meth:`_Wrapped.note` (what the executor string adds)."""
    if _KEPT is None:
        return _Wrapped(engine)
    model = g.read(open(path, "rb").read())
    if io == "tensor":
        kept = next((k for k in _KEPT if k.identity == identity), None)
        if kept is None:
            sg = model.subgraphs[0]
            kept = Kept(identity, model, _input_names(model),
                        [tuple(g._ids(sg.tensors[t].shape)) for t in g._ids(sg.inputs)])
            _KEPT[:] = [k for k in _KEPT if k.input_shapes == kept.input_shapes][-(KEPT_FILES - 1):] + [kept]
        return Keeping(engine, kept)
    for source in reversed(_KEPT):
        plan = plan_for(model, source)
        if plan is not None:
            return Served(engine, make_specs(), plan, make_cut)
    return _Wrapped(engine)
