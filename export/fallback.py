"""Sensitivity-guided fallback: a quantized file that misses its parity gate keeps its most
sensitive layers out of quantization, the fewest that make it pass.

When an artifact of a precision its backend lists in ``FALLBACK_PRECISIONS`` fails the gate
(TFLite ``int8``, ``int8-dynamic`` and ``int16x8``, Core ML ``w8``), the export (:mod:`export.api`, unless
``quant_fallback=False`` / ``--quant-fallback off``):

0. where another file of the same format, shape and precision (the other I/O signature) passed through the
   fallback earlier in the same run, gates that file's layers first (:class:`Seed`) and stops there if they
   pass; for the first file of its kind, the same with the layers a file of its kind kept float in an earlier
   export (``--quant-fallback-seeds``: by default the manifest a previous run left in the export folder, else the
   seed file beside the checkpoint, :mod:`export.fallback_seeds`; :func:`seeds_from_manifest`), as after a
   retraining; else, or where those fail:
1. ranks the generator's convolutions by the quantization noise each one adds on the held-out
   samples the file failed on (:func:`export.activations.layer_snr`: the SNR of the layer's own
   output with only its input and weights rounded to int8 -- ``int16x8``: its input to int16
   (:data:`SENSITIVITY_ROUNDING`) -- everything before it float32, worst of
   those samples; lowest first). One float forward per sample, about twice a forward's work: the
   end-to-end ranking (:func:`export.activations.int8_sensitivity`, the whole network again per
   layer) ran over 2 hours at 512x680 on this 2-core machine and was given up; the local SNR
   does not see how later layers amplify an error, which the gate of each candidate does. Only the
   convolutions the file rounds are ranked (the backend's ``unrounded_convs`` names those its converter
   leaves float), and so only they are simulated rounded or kept float by any phase;
2. converts candidates that keep the first k ranked layers in float (``keep_float`` job
   option: the backend decides what that means in its format, see :func:`export.tflite.float_nodes`)
   for k = 1, 2, 4, 8, ... up to the limit, and gates them in that order; then the k between
   the last failing and the first passing candidate, by bisection. The ranking is close to but
   not exactly monotone in k, so the smallest passing k found this way is the fewest *by this
   search*, not proven minimal. In two phases (:func:`phases`): first the layers alone, taken in
   ranking order while their MACs fit in :data:`FLOAT_MAC_BUDGET` (:func:`affordable`); then the
   first ``limit`` ranked layers whatever their MACs: where the backend lists the precision in
   ``FALLBACK_INPUT_PRECISIONS`` (TFLite ``int8`` and ``int16x8``: a convolution kept float there still
   reads an input its integer producer rounded) with the convolutions producing their inputs
   (``keep_float_inputs``), elsewhere (TFLite ``int8-dynamic``, Core ML ``w8``) alone; and a third,
   whole branches of the network (:func:`branch_phase`: ranked by the output's hole PSNR with only
   that branch rounded, :func:`export.activations.rounded_hole_psnr`, which sees an error building
   up along a branch; at most ``branch_limit`` layers; each branch is first gated kept float alone, in that
   order (:func:`singles`), and when none passes the cumulative candidates follow the order those files
   measured, :func:`reranked`), tried before the second unless the same
   simulation puts the second's largest candidate :data:`ORDER_MARGIN_DB` over the gate
   (:func:`after_first`). Before the first phase, the simulation of its largest candidate decides
   whether it goes first or, predicted more than :data:`DEFER_MARGIN_DB` under the gate, last
   (:func:`defer_first`): a phase waits, never is dropped. A candidate
   the first phase already gated (the same layers) is not converted or gated again; a candidate's
   gate runs the samples the pure file failed first, worst first, and stops at the first it fails (a file on
   LiteRT's single-threaded reference kernels, int16x8: as many at a time as the gate has threads);
   Between the first phase and the later ones, a TFLite ``int8-dynamic`` file of the ``tf`` variant (with
   ``--input-groups`` above 1) tries one more candidate, phase :data:`GROUPS_PHASE`: every convolution int8, the
   inputs of its ``--input-group-layers`` most sensitive convolutions split into channel groups with a run-time
   grid each (:mod:`export.input_groups`); a file it passes has no layer float and is not pruned; where it fails,
   phase :data:`GROUPED_FLOAT_PHASE`: the same file with the first phase's layers (within the MAC budget) kept
   float, k = 1, 2, 4, ... and bisection as above, not pruned either;
3. prunes the passing candidate (:func:`prune`, phase :data:`PRUNE_PHASE`; not a seed's, nor a file on
   LiteRT's reference kernels, whose gate takes minutes a sample): its float convolutions, most MACs first,
   go back to quantization in groups, halved after a group fails, while the file still passes, at most
   ``--quant-fallback-prune`` candidates. The search finds the fewest layers *in its ranking's order*; the ranking is
   a local one and a branch a coarse unit, and the passing candidate can keep far more float than the file
   needs (default model v2, TFLite int8-dynamic at 1024x1360: 32 convolutions float at 62.3 dB against a
   40 dB gate);
4. writes the passing candidate under the artifact's name, its manifest entry recording the
   layers kept float, their sensitivity, the share of convolution MACs still quantized, the
   search, and the price beside the pure file: size, latency and peak RSS, measured in one run
   each (``benchmarks.measure.measure_file``, passed in by the command line), or, for a file that keeps float
   what the other I/O signature's file kept, sizes and that file's latency ratio (:func:`shared_price`);
5. or, when even the limits' candidates fail, fails the artifact with the top layers and their
   sensitivity, the branches tried, and the options that change the outcome.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .fallback_seeds import SeedSource, fallback_record

# How many ranked layers a file may keep in float by default: a quarter of GMCNN's 44
# convolutions. Measured need (docs/TOLERANCES.md): see the per-file table there.
DEFAULT_LIMIT = 11
# How many layers the branch phase's candidates may keep in float by default: three quarters of GMCNN's 44
# convolutions. The shipped model's TFLite int8-dynamic file at 1024x1360 needs 32 (the second and third
# branches and the merge), simulated: with 16 float (b2 and the merge) its worst held-out sample stays at
# 32.6 dB against a 40 dB gate; Core ML w8 there needs 14 (b2). docs/TOLERANCES.md, "Branches at 1024x1360".
DEFAULT_BRANCH_LIMIT = 33
# The share of the network's convolution MACs the first phase's candidates may keep float
# (issue 13: an int8 file keeps at least 90 % of them in int8).
FLOAT_MAC_BUDGET = 0.10
# What the sensitivity rounds per layer, for each precision the fallback serves (export.activations.ROUNDINGS:
# int16x8 rounds its inputs on the 16x8 files' symmetric int16 grid, its weights to int8 like the others).
SENSITIVITY_ROUNDING = {"int8": ("input", "weights"), "int8-dynamic": ("input", "weights"),
                        "int16x8": ("input16", "weights"), "w8": ("weights",)}
PRICE_RUNS = 3
# How many candidates the pruning of a passing candidate (:func:`prune`) may try by default: a failing one costs
# a conversion and the gate of one held-out sample (about 2 s at 512x680, 7 s at 1024x1360 here), a passing one
# the gate of every sample (8 s, 16-30 s). Pruning to the end took 16 for the 14 layers of default model v2's
# int8-dynamic file at 512x680 (84.5 % int8 against 79.6 % after 12: short of 90 % either way) and would take
# over 30 for its 32 at 1024x1360 (docs/TOLERANCES.md, "The fallback's pruning").
DEFAULT_PRUNE_GATES = 12
# How far the simulation of a candidate (export.activations.rounded_hole_psnr) is trusted, from the 13 pairs
# of predicted and gated hole PSNR on the shipped model in docs/TOLERANCES.md ("Predicted against gated"):
# it over-predicted Core ML w8 by up to 1.8 dB (TFLite int8-dynamic, whose input rounding it approximates,
# by up to 4.8 dB) and under-predicted once, by 0.72 dB. Phase 2 goes before the branch phase only when its
# largest candidate is predicted at least ORDER_MARGIN_DB over the gate; phase 1 waits until the later
# phases have failed when its largest candidate is predicted more than DEFER_MARGIN_DB under the gate.
ORDER_MARGIN_DB = 2.0
DEFER_MARGIN_DB = 2.0


def sensitivity_rounding(precision: str, bias_corrected: bool) -> Tuple[str, ...]:
    """What the sensitivity and the simulations round for a file of ``precision``
    (:data:`SENSITIVITY_ROUNDING`), with ``bias`` where the file's biases are corrected for its rounded weights."""
    rounding = tuple(SENSITIVITY_ROUNDING[precision])
    return (*rounding, "bias") if bias_corrected else rounding


def rounding_words(rounding: Sequence[str]) -> str:
    """What a sensitivity rounding does, in words: ``input and weights rounded to int8``, ``input rounded to
    int16, weights to int8``, ``weights rounded to int8``."""
    if "input16" in rounding:
        return "input rounded to int16" + (", weights to int8" if "weights" in rounding else "")
    words = " and ".join(part for part in ("input", "weights") if part in rounding) + " rounded to int8"
    return words + (", biases corrected" if "bias" in rounding else "")


def affordable(ranking: Sequence[Tuple[str, float]], macs: Dict[str, int], limit: int,
               budget: float = FLOAT_MAC_BUDGET) -> List[Tuple[str, float]]:
    """The ranked layers the first phase may keep float: in ranking order, each layer whose MACs
    (``macs``: layer -> MACs of one inference, every convolution) fit in ``budget`` (a share of all of
    them) with the layers taken before it, at most ``limit`` layers. A layer too costly is passed
    over, not the end of the list: a cheaper, less sensitive one after it may still fit."""
    allowed = budget * sum(macs.values())
    taken: List[Tuple[str, float]] = []
    used = 0
    for layer, db in ranking:
        if len(taken) == limit:
            break
        if used + macs[layer] <= allowed:
            taken.append((layer, db))
            used += macs[layer]
    return taken


@dataclass
class Phase:
    number: int  # 0: another file's passing layers (SEED_PHASE); 1: within the MAC budget; 2: whatever the
    # MACs; 3: whole branches (BRANCH_PHASE)
    layers: List[Tuple[str, float]]  # its ranked layers, (name, output SNR dB), a candidate keeps a prefix float
    inputs_float: bool  # and the convolutions producing their inputs
    # the branch phase: its ranked branches, (branch, hole PSNR dB with only that branch rounded, its
    # convolutions); a candidate keeps the convolutions of a prefix float
    branches: Optional[List[Tuple[str, float, List[str]]]] = None

    @property
    def size(self) -> int:
        """The largest candidate: how many ranked layers (or branches) it keeps float."""
        return len(self.branches) if self.branches is not None else len(self.layers)

    def kept(self, k: int) -> List[str]:
        """The convolutions the phase's k-th candidate keeps float."""
        if self.branches is not None:
            return [layer for _, _, layers in self.branches[:k] for layer in layers]
        return [name for name, _ in self.layers[:k]]


BRANCH_PHASE = 3
SEED_PHASE = 0
PRUNE_PHASE = 4
# Every convolution int8, the most sensitive ones' inputs split into channel groups (export.input_groups): the
# candidate a TFLite int8-dynamic file tries after the first phase, before any phase that keeps more float
GROUPS_PHASE = 5
# The grouped candidate with the first phase's layers kept float, the fewest that pass: where the grouped candidate
# alone fails (at 1024x1360 on default model v2 by 0.1 dB), before the branch and second phases, which keep
# whole branches or any layer float whatever their MACs
GROUPED_FLOAT_PHASE = 6
# the phases whose file has its inputs in channel groups: a seed from one of them starts from the grouped file
GROUPED_PHASES = (GROUPS_PHASE, GROUPED_FLOAT_PHASE)


@dataclass(frozen=True)
class Seed:
    """What a passing fallback file leaves for the next file of its kind (format, shape and precision) in the
    same export run -- the other I/O signature, which wraps the same network: that file gates these layers
    first (phase :data:`SEED_PHASE`) and runs its own sensitivity and search only if they fail it. At
    1024x1360 on the default model v2 the image files' searches took as long as the tensor files' (branch
    simulations, several candidates each) to keep the same branches float."""
    file: str  # the file that found them
    layers: List[str]  # the convolutions it keeps float
    inputs_float: bool  # with the convolutions producing their inputs
    ranking: Tuple[Tuple[str, float], ...]  # its sensitivity ranking, (layer, output SNR dB), most sensitive first
    branches_kept_float: Optional[List[str]] = None  # where it passed in the branch phase
    # where it passed with its inputs in channel groups (phase GROUPS_PHASE, ``layers`` empty; or
    # GROUPED_FLOAT_PHASE, ``layers`` float): the next file tries that candidate first
    input_groups: bool = False
    # a seed from an earlier export's manifest (:func:`seeds_from_manifest`), maybe of another checkpoint: that
    # export's checkpoint and time, recorded with the file it seeds; None for a file of this run
    earlier: Optional[Dict[str, object]] = None
    # the file's price where its latency was timed (:func:`price`): a file that passes keeping the same float takes
    # its latency ratio (:func:`shared_price`); an earlier export's only where timed on a machine like this one
    price: Optional[Dict[str, object]] = None

    @property
    def source(self) -> str:
        """The file that found the seed's layers, in words."""
        return f"{self.file} of an earlier export" if self.earlier else self.file


def seeds_from_manifest(manifest, convs: Sequence[str], kinds: Optional[Sequence[tuple]] = None,
                        machine: Optional[Dict[str, object]] = None,
                        threads: Optional[int] = None) -> Tuple[Dict[tuple, Seed], List[str]]:
    """Seeds from an earlier export's manifest (:class:`runtime_py.manifest.Manifest`, or a seed file read back,
    :class:`export.fallback_seeds.SeedSource`: the same records, ``earlier`` names the file), for the fallback files of
    this run that no file of the run has seeded yet: the layers a retrained model needs float are most often those
    its previous version needed, and gating them (one candidate) replaces the sensitivity, the phases and the
    pruning (the four quantized TFLite files at 1024x1360 of default model v2, on the AVX2 EPYC: 3,910 s of the
    fallback's own time from scratch, 1,110 s seeded; docs/EXPORT.md, "Export wall time").

    Per (format, shape, precision), the first file of the manifest the fallback made: its layers kept float, with
    their inputs or not, the branches it kept float, whether its inputs were in channel groups, and its ranking (the
    record's ``ranking``; an older manifest has none: the kept layers' own output SNRs). ``convs``: the names of this
    run's generator's convolutions. A record naming another convolution (another network) is left out, and so is
    a grouped one without a ranking (which convolutions get groups follows the ranking). ``kinds``: the (format,
    shape, precision) this run makes (None: every kind). ``machine`` (:func:`runtime_py.machine.timing_machine`) and
    ``threads``: where the record's price was timed on a machine that reads the same, at these threads, the seed
    carries it, and a file that passes keeping the seed's float takes its latency ratio (:func:`shared_price`):
    the ratio is the network's and the machine's, not the weights' (a retrained model's file of the same layers
    runs the same kernels), and timing it took 342 s of the 1024x1360 files' seeded export on the AVX2 EPYC.
    Returns (the seeds, one line per record left out of a kind that got no seed, saying why)."""
    seeds: Dict[tuple, Seed] = {}
    why: Dict[tuple, List[str]] = {}
    known = set(convs)
    earlier = {"checkpoint_sha256": (manifest.checkpoint or {}).get("sha256"),
               "weights_sha256": (manifest.checkpoint or {}).get("weights_sha256"), "created": manifest.created}
    if isinstance(manifest, SeedSource):
        earlier["seed_file"] = manifest.path.name
    for a in manifest.artifacts:
        record = fallback_record(a)
        key = (a.format, tuple(a.shape), a.precision)
        if not record or key in seeds or (kinds is not None and key not in kinds):
            continue
        left_out = why.setdefault(key, [])
        kept = [(k["layer"], k.get("snr_db", float("nan"))) for k in record.get("layers_kept_float", [])]
        ranked = [(k["layer"], k["snr_db"]) for k in record.get("ranking", [])]
        grouped = record.get("phase") in GROUPED_PHASES
        unknown = sorted({name for name, _ in kept + ranked} - known)
        if unknown:
            left_out.append(f"{a.file}: its layers are not this network's ({', '.join(unknown[:3])})")
            continue
        if not kept and not grouped:
            left_out.append(f"{a.file}: keeps no layer float")
            continue
        if grouped and not ranked:
            left_out.append(f"{a.file}: passed with its inputs in channel groups, and the manifest has no ranking "
                            "to choose them by")
            continue
        branches = (record.get("branches") or {}).get("kept_float")
        timed = record.get("price") or {}
        same_machine = (machine is not None and timed.get("latency_ratio") is not None
                        and timed.get("machine") == machine
                        and (timed.get("threads") == threads or bool(timed.get("first_inference_timed"))))
        seeds[key] = Seed(a.file, [name for name, _ in kept], bool(record.get("inputs_kept_float")),
                          tuple(ranked or kept), list(branches) if branches else None, input_groups=grouped,
                          earlier=earlier, price=dict(timed) if same_machine else None)
    return seeds, [line for key, lines in why.items() if key not in seeds for line in lines]


def seed_phase(seed: Seed) -> Phase:
    """Phase :data:`SEED_PHASE`: one candidate, the seed's layers float (with their inputs where the seed's were)."""
    snr = dict(seed.ranking)
    return Phase(SEED_PHASE, [(name, snr.get(name, float("nan"))) for name in seed.layers], seed.inputs_float)


def phases(ranking: Sequence[Tuple[str, float]], macs: Dict[str, int], limit: int, with_inputs: bool,
           budget: Optional[float] = None) -> List[Phase]:
    """The fallback's phases for a file whose ranked layers are ``ranking`` (most sensitive first):

    1. the layers alone while their MACs fit in ``budget`` (:func:`affordable`; default
       :data:`FLOAT_MAC_BUDGET`);
    2. the first ``limit`` ranked layers whatever their MACs, with the convolutions producing their
       inputs where ``with_inputs`` (the backend lists the precision in ``FALLBACK_INPUT_PRECISIONS``),
       else alone; left out when it would repeat the first (every ranked layer fitted the budget).

    A phase with no layers (no single layer fits the budget) is left out."""
    first = Phase(1, affordable(ranking, macs, limit, FLOAT_MAC_BUDGET if budget is None else budget), False)
    second = Phase(2, list(ranking[:limit]), with_inputs)
    out = [first] if first.layers else []
    if second.layers and (with_inputs or second.layers != first.layers):
        out.append(second)
    return out


def branch_phase(scores: Dict[str, float], branches: Dict[str, List[str]], limit: int) -> Optional[Phase]:
    """The branch phase (number :data:`BRANCH_PHASE`) for a file whose per-layer phases failed: the
    generator's branches (``branches``: name -> convolutions, :func:`models.gmcnn.conv_branches`) ranked by
    ``scores`` (name -> hole PSNR in dB with only that branch rounded to int8, the rest float32: lowest
    first), each taken while the layers of those taken fit in ``limit`` (a branch too large is passed over,
    as :func:`affordable` does with MACs). A candidate keeps the first k of them float, their layers
    alone (a whole branch float has no rounded tensor inside it). None when no branch fits."""
    ranked = sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))
    taken, used = [], 0
    for name, db in ranked:
        if used + len(branches[name]) <= limit:
            taken.append((name, db, list(branches[name])))
            used += len(branches[name])
    return Phase(BRANCH_PHASE, [], False, taken) if taken else None


def singles(phase: Phase) -> List[Phase]:
    """The branch phase's branches one at a time (its order): each a phase whose one candidate keeps only that
    branch float. Gated before the cumulative candidates because the simulation that ranks the branches can be
    far off for a file's own arithmetic (TFLite int8-dynamic at 512x680 on the default model v2: branch b2
    simulated at 55.3 dB with only it rounded, measured 38.2 dB in the file; kept float alone, it passes)."""
    return [Phase(BRANCH_PHASE, [], False, [branch]) for branch in phase.branches]


def reranked(phase: Phase, measured: Dict[str, float]) -> Phase:
    """The branch phase with its branches ordered by ``measured`` (branch -> the file's hole PSNR in dB with only
    that branch kept float: highest first, the most costly branch), for the cumulative candidates after no
    branch passed alone."""
    order = sorted(phase.branches, key=lambda b: (-measured.get(b[0], float("-inf")), b[0]))
    return Phase(BRANCH_PHASE, [], False, order)


def after_first(rest: Sequence[Phase], branch: Optional[Phase], predicted_db: Optional[float],
                limit_db: float, margin_db: Optional[float] = None) -> List[Phase]:
    """The phases to try after the first failed: the second (``rest``) and the branch phase, the branch
    phase first when the simulation does not put the second's largest candidate at least ``margin_db``
    over the gate (``predicted_db``: its hole PSNR from :func:`export.activations.rounded_hole_psnr`, worst
    sample, under ``limit_db + margin_db``; :data:`ORDER_MARGIN_DB`); the other order otherwise. Both are
    tried either way: a wrong prediction costs time (or a file with more layers float than the second
    phase would have needed), never a file that passes."""
    margin_db = ORDER_MARGIN_DB if margin_db is None else margin_db
    second = list(rest)
    extra = [branch] if branch is not None else []
    if predicted_db is not None and predicted_db < limit_db + margin_db:
        return extra + second
    return second + extra


def defer_first(predicted_db: Optional[float], limit_db: float, margin_db: Optional[float] = None) -> bool:
    """Whether the first phase waits until the later ones have failed: when the simulation puts its largest
    candidate more than ``margin_db`` under the gate (``predicted_db``: hole PSNR, worst sample, from
    :func:`export.activations.rounded_hole_psnr`; :data:`DEFER_MARGIN_DB`), so that no candidate of it is
    expected to pass. Deferred, never dropped: it is still tried if the others fail."""
    margin_db = DEFER_MARGIN_DB if margin_db is None else margin_db
    return predicted_db is not None and predicted_db < limit_db - margin_db


def search_order(limit: int) -> List[int]:
    """The first batch of candidate sizes: 1, 2, 4, ... below ``limit``, then ``limit``."""
    ks, k = [], 1
    while k < limit:
        ks.append(k)
        k *= 2
    return ks + [limit]


@dataclass
class Candidate:
    k: int
    path: object  # Path of the converted file, or None when the conversion failed
    details: dict
    result: object = None  # ParityResult once gated
    conversion: object = None  # the backend's ConvertResult, which accepting the winner moves into place
    layers: Sequence[str] = ()  # the generator convolutions it keeps float
    inputs_float: bool = False  # and the convolutions producing their inputs (int8's second phase)
    phase: int = 1  # the phase that first built it (a later phase reuses a candidate of the same layers)


class SensitivityCache:
    """Per (shape, rounding, sample index): every convolution's output SNR (dB) with only it quantized; per
    (shape, rounding, rounded convolutions, sample index): the simulated output's hole PSNR (dB)."""

    def __init__(self, generator, holdout: Dict[Tuple[int, int], object], progress: Callable[[str], None],
                 bias_means: Optional[Callable[[Tuple[int, int]], Dict[str, object]]] = None):
        self.generator = generator
        self.holdout = holdout
        self.progress = progress
        # shape -> each convolution's input means: a rounding with ``bias`` (int8-dynamic's corrected biases) needs them
        self.bias_means = bias_means
        self._scores: Dict[tuple, object] = {}
        self._downstream: Optional[Dict[str, set]] = None
        self._expected: Dict[tuple, set] = {}  # (shape, rounding) -> the samples fallbacks to come will rank on

    def expect(self, shape, rounding: Sequence[str], samples: Sequence[int]) -> None:
        """Say that a fallback will rank on ``samples`` with ``rounding`` at ``shape``: the first ranking at that
        shape measures this rounding as well on the samples both need, in the same pass
        (:func:`export.activations.layer_snr_each`: one float forward for both; at 1024x1360 on default model v2
        the int8 and int8-dynamic files rank on the same four held-out samples)."""
        self._expected.setdefault((shape, tuple(rounding)), set()).update(samples)

    def ranking(self, shape, rounding: Sequence[str], samples: Sequence[int]) -> List[Tuple[str, float]]:
        """(layer, worst output SNR in dB over ``samples``), most sensitive first."""
        from .activations import layer_snr_each

        rounding = tuple(rounding)
        todo = [i for i in samples if (shape, rounding, i) not in self._scores]
        if todo:
            # another expected rounding at this shape rides along where it wants every sample this pass runs
            along = [r for (sh, r), want in self._expected.items() if sh == shape and r != rounding
                     and set(todo) <= want and any((shape, r, i) not in self._scores for i in todo)]
            s = self.holdout[shape]
            self.progress(f"fallback {shape[0]}x{shape[1]}: output SNR of every convolution "
                          f"({'; '.join(rounding_words(r) for r in [rounding] + along)}) "
                          f"on held-out sample(s) {', '.join(str(i) for i in todo)}")
            t0 = time.time()
            means = next((m for m in (self._means(shape, r) for r in [rounding] + along) if m is not None), None)
            per = layer_snr_each(self.generator, s.images[todo], s.masks[todo], [rounding] + along, bias_means=means)
            self.progress(f"fallback {shape[0]}x{shape[1]}: sensitivity ready ({time.time() - t0:.1f}s)")
            for r, layers in per.items():
                for j, i in enumerate(todo):
                    self._scores.setdefault((shape, r, i), {layer: v[j] for layer, v in layers.items()})
        layers = self._scores[(shape, rounding, samples[0])]
        worst = {layer: min(self._scores[(shape, rounding, i)][layer] for i in samples) for layer in layers}
        return sorted(worst.items(), key=lambda kv: (kv[1], kv[0]))

    def _means(self, shape, rounding: Sequence[str]):
        return self.bias_means(shape) if "bias" in rounding and self.bias_means is not None else None

    def downstream(self) -> Dict[str, set]:
        """:func:`export.activations.downstream_convs` of the generator, found once."""
        from .activations import downstream_convs

        if self._downstream is None:
            self._downstream = downstream_convs(self.generator)
        return self._downstream

    def simulated(self, shape, rounding: Sequence[str], samples: Sequence[int],
                  configs: Dict[str, Sequence[str]]) -> Dict[str, float]:
        """Per config (name -> convolutions rounded to int8, the rest float32), the output's hole PSNR in
        dB, worst over ``samples`` (:func:`export.activations.rounded_hole_psnr`); each (config, sample)
        simulated once per export."""
        from .activations import rounded_hole_psnr

        key = {name: (shape, tuple(rounding), frozenset(layers)) for name, layers in configs.items()}
        todo = [i for i in samples if any((*key[name], i) not in self._scores for name in configs)]
        if todo:
            s = self.holdout[shape]
            missing = {name: layers for name, layers in configs.items()
                       if any((*key[name], i) not in self._scores for i in todo)}
            self.progress(f"fallback {shape[0]}x{shape[1]}: output hole PSNR with {', '.join(missing)} rounded "
                          f"({rounding_words(rounding)}) on held-out sample(s) {', '.join(str(i) for i in todo)}")
            t0 = time.time()
            per = rounded_hole_psnr(self.generator, s.images[todo], s.masks[todo], missing, rounded=rounding,
                                    downstream=self.downstream(), bias_means=self._means(shape, rounding))
            self.progress(f"fallback {shape[0]}x{shape[1]}: simulation ready ({time.time() - t0:.1f}s)")
            for name, values in per.items():
                for j, i in enumerate(todo):
                    self._scores[(*key[name], i)] = values[j]
        return {name: min(self._scores[(*key[name], i)] for i in samples) for name in configs}


def prune_order(layers: Sequence[str], macs: Dict[str, int], snr: Dict[str, float]) -> List[str]:
    """The order :func:`prune` tries to quantize ``layers`` (convolutions kept float) again in: most MACs first
    (what the int8 share and the latency gain), among equal MACs the least sensitive first (highest output SNR
    in ``snr``, dB; a layer without one last), then by name."""
    def key(name):
        s = snr.get(name)
        return (-macs.get(name, 0), -(s if s is not None and s == s else float("-inf")), name)

    return sorted(layers, key=key)


def prune(layers: Sequence[str], order: Sequence[str], passes: Callable[[List[str]], bool],
          max_candidates: int) -> Tuple[List[str], int]:
    """The passing set ``layers`` (convolutions kept float) made smaller: the layers of ``order`` (a permutation
    of them, :func:`prune_order`) are taken out in groups -- the first half of them at first, the group halved
    after a candidate fails, kept after one passes -- each group out only while ``passes(the layers left)`` (the
    file converted and gated) holds; a single layer whose candidate fails stays. Never tries the empty set (the
    pure file, which failed) and stops after ``max_candidates`` calls of ``passes``. Returns (the layers left,
    in ``layers``' order; the number of candidates tried)."""
    current = list(layers)
    todo = [name for name in order if name in current]
    chunk = max(1, len(todo) // 2)
    tried = 0
    while todo and tried < max_candidates:
        group = todo[:chunk]
        left = [name for name in current if name not in group]
        if not left:  # every layer at once: the pure file
            if chunk > 1:
                chunk = max(1, chunk // 2)
            else:
                todo.pop(0)
            continue
        tried += 1
        if passes(left):
            current, todo = left, todo[len(group):]
        elif chunk > 1:
            chunk = max(1, chunk // 2)
        else:
            todo.pop(0)
    return current, tried


def move_to_front(order: Sequence[int], sample: int) -> List[int]:
    """``order`` (held-out sample indices) with ``sample`` first: the sample a pruning candidate just failed on is
    the likeliest to fail the next one, which then stops after one inference instead of several."""
    return [sample] + [i for i in order if i != sample]


def failing_samples(result, limit_db: float) -> List[int]:
    """Indices of the held-out samples whose hole PSNR is under the limit, worst first (all, in order, if
    not recorded): the order the gate of a candidate runs them in, stopping at the first that fails. A result
    with nudged copies (``details.nudged``; those of ``sample_indices`` where the gate stopped at a failing one)
    gives each sample the worse PSNR of it and its copy. Takes results whose samples all ran (a pure file's, a
    passing candidate's) or that stopped at a sample without copies: a pruning candidate that stopped part-way through
    its pairs of sample and copy has per-sample lists whose positions are not sample indices (its
    ``details.stopped_at`` says where it stopped)."""
    details = result.details or {}
    per = details.get("hole_psnr_db_per_sample") or []
    record = details.get("nudged") or {}
    nudged, copied, of = record.get("samples", 0), record.get("sample_indices"), record.get("of", 0)
    if nudged and copied is not None and len(per) == of + len(copied):  # the copies of some samples: the gate
        worse = list(per[:of])  # stopped at the first copy that failed
        for j, i in enumerate(copied):
            worse[i] = min(worse[i], per[of + j])
        per = worse
    elif nudged and len(per) == 2 * nudged:  # every sample, then its nudged copy: a sample counts as its worse one
        per = [min(plain, copy) for plain, copy in zip(per[:nudged], per[nudged:])]
    bad = sorted((i for i, v in enumerate(per) if v < limit_db), key=lambda i: (per[i], i))
    return bad or list(range(max(len(per) or result.samples, 1)))


def limit_message(file: str, precision: str, limit: int, ranking: Sequence[Tuple[str, float]], best,
                  branch: Optional[Phase] = None, branch_limit: Optional[int] = None) -> str:
    top = ", ".join(f"{layer} {db:.1f} dB" for layer, db in ranking[:5])
    got = best.result.note if best is not None and best.result is not None else "no file converted"
    branches = ""
    if branch_limit is not None:
        tried = (", ".join(f"{name} {db:.1f} dB ({len(layers)} layers)" for name, db, layers in branch.branches)
                 if branch is not None else "none fits")
        branches = (f"; whole branches kept float, up to {branch_limit} layers (hole PSNR with only that branch "
                    f"rounded: {tried}) failed too: raise --quant-fallback-branch-limit")
    return (f"parity: still failing with the {limit} most sensitive layers kept float (best candidate: {got}); "
            f"most sensitive (output SNR with only that layer's "
            f"{rounding_words(SENSITIVITY_ROUNDING.get(precision, ('input', 'weights')))}): {top}; raise --quant-fallback-limit "
            f"(at most {len(ranking)}){branches}, calibrate on photos closer to yours (--calibration DIR), or drop "
            f"{precision}")


def search(ks_first: Sequence[int], build: Callable[[Sequence[int]], Dict[int, Candidate]],
           gate: Callable[[Candidate], bool]) -> Tuple[Optional[Candidate], List[Candidate]]:
    """The smallest passing candidate size: gate ``ks_first`` in order until one passes, then bisect
    between the last failure and it. ``build(ks)`` converts candidates; returns (winner or None, all gated)."""
    gated: List[Candidate] = []
    first = build(ks_first)
    lo, hi = 0, None
    for k in ks_first:
        cand = first[k]
        ok = cand.path is not None and gate(cand)
        gated.append(cand)
        if ok:
            hi = cand
            break
        lo = k
    if hi is None:
        return None, gated
    between = list(range(lo + 1, hi.k))
    if between:
        built = build(between)
        a, b = 0, len(between)  # passing k lies in between[a:b] or is hi
        while a < b:
            mid = (a + b) // 2
            cand = built[between[mid]]
            ok = cand.path is not None and gate(cand)
            gated.append(cand)
            if ok:
                hi, b = cand, mid
            else:
                a = mid + 1
    return hi, gated


def same_float(candidate: Candidate, seed: Seed) -> bool:
    """Whether ``candidate`` keeps float what ``seed``'s file keeps (the same convolutions, with their inputs or
    not, its inputs in channel groups or not): the other I/O signature's file of the same network, whose price then
    is this one's."""
    return (sorted(candidate.layers) == sorted(seed.layers) and candidate.inputs_float == seed.inputs_float
            and (candidate.phase in GROUPED_PHASES) == seed.input_groups)


def shared_price(pure_path, fallback_path, timed: Dict[str, object], of: str) -> Dict[str, object]:
    """The price of a file that keeps float what ``of`` keeps (:func:`same_float`; the other I/O signature's file,
    whose price ``timed`` this run measured with :func:`price`, or an earlier export's file timed on a machine that
    reads the same, :func:`seeds_from_manifest`): the two files' sizes, and ``of``'s latency ratio
    (``latency_ratio_of``, with the ``machine`` it was timed on). The two signatures wrap one network in a few I/O
    ops; timing them both cost 4 x 175 s at 1024x1360 and 4 x 43 s at 512x680 of a full default export on the AVX2
    EPYC (2026-12-06), and their ratios for the same layers differed by up to 0.2 (1.074 against 0.948, 1.025
    against 0.824), where one benchmark run puts the two signatures' files within 1.5 % of each other: the drift
    between the processes, not the files."""
    from pathlib import Path

    from runtime_py.manifest import artifact_digest

    out: Dict[str, object] = {"threads": timed.get("threads"), "runs": 0,
                              "pure": {"bytes": artifact_digest(Path(pure_path))[1]},
                              "fallback": {"bytes": artifact_digest(Path(fallback_path))[1]}}
    out["size_ratio"] = round(out["fallback"]["bytes"] / out["pure"]["bytes"], 3)
    out.update(latency_ratio=timed["latency_ratio"], latency_ratio_of=of,
               not_timed=f"keeps float what {of} keeps: its latency ratio")
    if timed.get("machine") is not None:  # where the ratio was timed: a later export may take it in turn
        out["machine"] = timed["machine"]
    return out


def price(pure_path, fallback_path, threads: int, fmt: str, measure=None, runs: int = PRICE_RUNS,
          reference_kernels: bool = False) -> Dict[str, object]:
    """Size of the pure and the fallback file and, for TFLite with a ``measure`` function
    (``benchmarks.measure.measure_file``: each file in its own process), latency (median of ``runs`` after
    one warm-up, the files one after the other) and peak RSS. Without ``measure``, or for Core ML packages (no
    Core ML runs here to time them), sizes only.

    ``reference_kernels``: the files' convolutions run on LiteRT's single-threaded reference kernels (int16x8,
    one inference of the default model about 2 min at 512x680 here): each file's first inference is the one
    timed (no warm-up, no further runs: ``measure`` with ``runs`` 0), on one thread, the two files side by side
    on their own cores (one core each is what those kernels use whatever the thread count) -- the ratio, not a
    benchmark's latency, is what the price is for."""
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from runtime_py.manifest import artifact_digest

    from runtime_py.machine import timing_machine

    timed = fmt == "tflite" and measure is not None
    if reference_kernels:
        threads, runs = 1, 1
    out: Dict[str, object] = {"threads": threads, "runs": runs if timed else 0}
    if timed:  # what decides whether a later export of the same layers may take this ratio (seeds_from_manifest)
        out["machine"] = timing_machine()
    labelled = (("pure", pure_path), ("fallback", fallback_path))
    measured: Dict[str, dict] = {}
    if timed and reference_kernels:
        out.update(warmup_runs=0, first_inference_timed=True, side_by_side=True)
        with ThreadPoolExecutor(max_workers=2) as pool:  # each call waits on its own benchmark process
            futures = {label: pool.submit(measure, Path(path), threads, 0, 0) for label, path in labelled}
            measured = {label: f.result() for label, f in futures.items()}
    elif timed:
        measured = {label: measure(Path(path), threads, runs) for label, path in labelled}
    for label, path in labelled:
        row: Dict[str, object] = {"bytes": artifact_digest(Path(path))[1]}
        if timed:
            r = measured[label]
            stats = r.get("stats", {}) if r.get("ok") else {}
            row.update(latency_median_s=stats.get("median_s"),
                       peak_rss_mib=round(r.get("peak_rss", 0) / 2 ** 20, 1) if r.get("ok") else None,
                       error=r.get("error") if not r.get("ok") else None)
        out[label] = row
    p, f = out["pure"], out["fallback"]
    if p.get("latency_median_s") and f.get("latency_median_s"):
        out["latency_ratio"] = round(f["latency_median_s"] / p["latency_median_s"], 3)
    out["size_ratio"] = round(f["bytes"] / p["bytes"], 3)
    if not timed:
        out["not_timed"] = ("Core ML packages are not run here" if fmt != "tflite" else
                            "no measure function given (the gmcnn-mobile command gives benchmarks.measure's)")
    return out
