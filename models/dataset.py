"""The default model's photos: which ones train, which validate, which are never trained on, and the
compact copy of them that travels to a borrowed GPU machine.

Layout of the shared data (``../shared/data`` beside a checkout; never committed)::

    train/<group>/<file>.jpg     176 photos in 6 groups (train/LICENSES.md)
    photos/<file>.jpg            14 wallpapers, two of which are the held-out pair

Every photo gets one flat *name*: ``<group>-<file>`` for ``train/``, ``<file>`` for ``photos/``
(``lomiri-Dragonfly_by_Bolly.jpg``, ``Aqua.jpg``). Names are what the trainer, the packed folder and
the model card use.

* :data:`HELD_OUT`: Kite.jpg and Path.jpg. Never trained on, never validated on during training, not
  even packed: they exist only for the final evaluation (``gmcnn-mobile evaluate``).
* :data:`VALIDATION`: 10 photos of varied content set aside from the training photos. The trainer
  picks its best checkpoint on them; they are packed (the trainer needs them) but never trained on.
* everything else trains.

:func:`pack` writes the travelling copy: every training and validation photo, orientation applied,
long side at most ``long_side`` px, re-encoded as JPEG at the highest quality of
:data:`PACK_QUALITIES` whose total fits the byte budget left by the working tree.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from runtime_py.errors import UserError

PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
HELD_OUT = ("Kite.jpg", "Path.jpg")
#: Set aside by name for validation (varied on purpose): dark mountain peaks, a sunset over rocks, fog over
#: fields, a portrait, a bridge at night, breaking waves, a mossy log, camels on a steppe, a hedgehog in
#: grass, a grey pier; from six groups and the wallpapers.
VALIDATION = (
    "enlightenment-Peaks.jpg",
    "lomiri-sunset_by_Aitzol_Berasategi.jpg",
    "lxqt-fog.jpg",
    "misc-astronaut.jpg",
    "misc-cincinnati-bridge.jpg",
    "tuxpaint-ocean_waves.jpg",
    "tuxpaint-mossy_log.jpg",
    "gcompris-erase_005.jpg",
    "gcompris-explore_world_animals_004.jpg",
    "ColdRipple.jpg",
)
#: What travels to the device machine in all (device tool limit), and what is kept free of it.
DEVICE_TREE_LIMIT = 64 * 2**20
DEFAULT_MARGIN = 6 * 2**20
PACK_QUALITIES = (90, 85, 80, 75, 70, 65, 60)
SPLIT_FILE = "split.json"


def find_sources(root: Path) -> Dict[str, Path]:
    """Every photo of the shared data layout (``root/train/<group>/*``, ``root/photos/*``) or of a flat
    folder, by flat name (held-out photos included); raises UserError when there are none or names collide."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: not a directory of photos")
    layout = (root / "train").is_dir() or (root / "photos").is_dir()
    if layout:
        files = sorted((root / "train").glob("*/*")) + sorted((root / "photos").glob("*"))
    else:
        files = sorted(root.iterdir())
    found: Dict[str, Path] = {}
    for f in files:
        if f.suffix.lower() not in PHOTO_SUFFIXES or not f.is_file():
            continue
        name = (f"{f.parent.name}-{f.name}" if f.parent.parent.name == "train" else f.name) if layout else f.name
        if name in found:
            raise UserError(f"two photos are both named {name}: {found[name]} and {f}")
        found[name] = f
    if not found:
        raise UserError(f"{root}: no photos ({', '.join(PHOTO_SUFFIXES)})")
    return found


@dataclass
class Split:
    """Names of the training, validation and held-out photos found in one folder."""

    train: List[str]
    validation: List[str]
    held_out: List[str]


def split_names(names: Sequence[str], validation: Sequence[str] = VALIDATION,
                held_out: Sequence[str] = HELD_OUT) -> Split:
    """Training = every name except the validation and held-out ones. Every validation name must be
    present (a missing one would silently move checkpoint choice to other photos); held-out names
    need not be (a packed folder has none)."""
    present = set(names)
    overlap = sorted(set(validation) & set(held_out))
    if overlap:
        raise UserError(f"photos both held out and validated on: {', '.join(overlap)}")
    missing = [n for n in validation if n not in present]
    if missing:
        raise UserError(f"validation photos not in the folder: {', '.join(missing)}")
    if not validation:
        raise UserError("at least one validation photo is needed (--val-photos)")
    excluded = set(validation) | set(held_out)
    train = sorted(n for n in names if n not in excluded)
    if not train:
        raise UserError("no training photos left after setting aside the validation and held-out photos")
    return Split(train, list(validation), sorted(n for n in held_out if n in present))


# ----------------------------------------------------------------------------------- packing

def travelling_tree_bytes(repo: Path) -> int:
    """Bytes of what the device tool sends besides carried paths: tracked files plus untracked files that
    git does not ignore (``git ls-files --cached --others --exclude-standard``)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise UserError(f"{repo}: cannot list the working tree with git ({exc}); pass --tree-mib") from None
    total = 0
    for rel in out.decode().split("\0"):
        p = Path(repo) / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    return total


def _read_oriented(path: Path) -> np.ndarray:
    """(H,W,3) uint8 RGB with EXIF orientation applied (the runtime's decoder)."""
    from runtime_py.imageio import read_image

    try:
        return read_image(path).rgb8()
    except UserError:
        raise
    except Exception as exc:  # a decoder's own error for a broken file
        raise UserError(f"{path}: not a readable image ({exc})") from None


def _shrink(rgb: np.ndarray, long_side: int) -> np.ndarray:
    import cv2

    h, w = rgb.shape[:2]
    scale = long_side / max(h, w)
    if scale >= 1.0:
        return rgb
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise UserError("JPEG encoding failed")
    return buf.tobytes()


@dataclass
class PackReport:
    out: str
    photos: int
    validation: List[str]
    long_side: int
    quality: int
    data_bytes: int
    budget_bytes: int
    source_pixels: int
    packed_pixels: int

    @property
    def pixel_share(self) -> float:
        return self.packed_pixels / max(self.source_pixels, 1)


def pack(root: Path, out: Path, budget_bytes: int, long_side: int = 1024,
         validation: Sequence[str] = VALIDATION, held_out: Sequence[str] = HELD_OUT,
         qualities: Sequence[int] = PACK_QUALITIES, progress: bool = True) -> PackReport:
    """Write every training and validation photo of ``root`` into the flat folder ``out`` (held-out photos
    left behind), long side <= ``long_side``, as JPEG at the highest of ``qualities`` whose files total at
    most ``budget_bytes``; plus ``out/split.json`` (the split, the settings, the sizes).

    ``out`` must not exist or be a folder this function wrote (it is replaced). Nothing is written when
    no quality fits: raises UserError naming the smallest total reached.
    """
    from tqdm import tqdm

    from runtime_py.imageio import write_bytes_atomic

    sources = find_sources(root)
    split = split_names(list(sources), validation, held_out)
    out = Path(out)
    if out.exists() and not (out / SPLIT_FILE).is_file():
        raise UserError(f"{out} exists and is not a packed photo folder (no {SPLIT_FILE}); choose another --out")
    names = sorted(split.train + split.validation)
    images, source_pixels = {}, 0
    for name in tqdm(names, desc="decode", disable=not progress):
        rgb = _read_oriented(sources[name])
        source_pixels += rgb.shape[0] * rgb.shape[1]
        images[name] = _shrink(rgb, long_side)
    packed_pixels = sum(im.shape[0] * im.shape[1] for im in images.values())
    smallest = None
    for quality in sorted(qualities, reverse=True):
        encoded = {n: _jpeg(im, quality) for n, im in images.items()}
        total = sum(len(b) for b in encoded.values())
        smallest = total
        if total <= budget_bytes:
            break
    else:
        raise UserError(f"the photos need {smallest / 2**20:.1f} MiB even at JPEG quality {min(qualities)}, over the "
                        f"{budget_bytes / 2**20:.1f} MiB left for them; lower --long-side")
    if out.exists():
        for old in out.iterdir():
            if old.is_file():
                old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in encoded.items():
        write_bytes_atomic(out / Path(name).with_suffix(".jpg").name, data)
    report = PackReport(str(out), len(encoded), list(split.validation), long_side, quality, total, budget_bytes,
                        source_pixels, packed_pixels)
    manifest = {**asdict(report), "train": [Path(n).with_suffix(".jpg").name for n in split.train],
                "held_out_left_behind": list(held_out)}
    write_bytes_atomic(out / SPLIT_FILE, json.dumps(manifest, indent=1).encode())
    return report


def packing_budget(repo: Path, limit: int = DEVICE_TREE_LIMIT, margin: int = DEFAULT_MARGIN,
                   tree_bytes: Optional[int] = None) -> int:
    """Bytes left for packed photos: the device limit minus the travelling tree minus a margin."""
    tree = travelling_tree_bytes(repo) if tree_bytes is None else tree_bytes
    left = limit - tree - margin
    if left <= 0:
        raise UserError(f"the working tree alone is {tree / 2**20:.1f} MiB: nothing is left of the "
                        f"{limit / 2**20:.0f} MiB the device tool carries once {margin / 2**20:.0f} MiB are kept free")
    return left
