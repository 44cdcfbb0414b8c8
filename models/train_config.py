"""The training run's configuration (no torch import here): shared by the CLI (:mod:`models.train_cli`)
and the trainer (:mod:`models.train`), which is why it lives in neither."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .dataset import HELD_OUT, VALIDATION

#: Settings that make up a run's identity: fixed when the run starts, taken from RUN_DIR/last.pt on --resume.
IDENTITY_KEYS = ("variant", "cnum", "seed", "val_photos", "exclude_photos", "cache_short_side", "max_scale",
                 "val_size", "val_masks_per_photo", "init", "init_from", "reinit")


@dataclass
class TrainConfig:
    """One training run. Sizes are pixels; shapes are (rows, cols); fractions are of the image area.

    Sample kinds: a step's batch is either ``batch_size`` square crops of side ``crop`` (random scale,
    ``crop``..``crop * max_scale`` px of the cached photo) or, with probability ``whole_fraction``,
    ``whole_batch_size`` whole photos (random window of the photo's aspect covering 60-100 % of it,
    turned to landscape as the runtime does) resized to ``whole_size``. Hole masks cover up to
    ``max_hole`` of the image; the cap grows linearly from ``hole_start`` over ``hole_ramp_steps``
    steps of the current phase (a curriculum), 0 = ``max_hole`` from the start.
    """

    photos: str
    out: str
    variant: str = "tf"
    cnum: int = 32
    crop: int = 256
    batch_size: int = 1
    whole_fraction: float = 0.0
    whole_size: Tuple[int, int] = (512, 680)
    whole_batch_size: int = 1
    max_hole: float = 0.4
    hole_start: float = 0.3
    hole_ramp_steps: int = 0
    lr: float = 2e-4
    warmup_steps: int = 0
    lr_decay_minutes: float = 0.0
    lr_final_fraction: float = 0.1
    clip_grad_norm: float = 0.0
    activation_penalty: float = 0.0
    activation_limit: float = 50.0
    max_minutes: float = 60.0
    max_steps: int = 0
    val_photos: List[str] = field(default_factory=lambda: list(VALIDATION))
    exclude_photos: List[str] = field(default_factory=lambda: list(HELD_OUT))
    val_size: Tuple[int, int] = (512, 680)
    val_masks_per_photo: int = 2
    peak_samples: Optional[str] = None
    init: str = "reference"
    init_from: Optional[str] = None
    reinit: List[str] = field(default_factory=list)
    val_every_minutes: float = 3.0
    checkpoint_every_minutes: float = 3.0
    log_every: int = 10
    cache_short_side: int = 768
    max_scale: float = 3.0
    seed: int = 0
    device: str = "auto"
    threads: int = 2
    amp: str = "off"
    compile: str = "off"
    loader_threads: int = -1

    def __post_init__(self):
        self.whole_size = tuple(int(v) for v in self.whole_size)
        self.val_size = tuple(int(v) for v in self.val_size)
        self.val_photos = list(self.val_photos)
        self.exclude_photos = list(self.exclude_photos)
        self.reinit = list(self.reinit)
