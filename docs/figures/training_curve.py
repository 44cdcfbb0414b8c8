"""The default model's training curve (docs/img/default_model_v2_training.png): validation hole PSNR / SSIM
and the largest convolution output on the export's held-out samples at 1024x1360, per validation step, from
a trainer log (``RUN_DIR/log.jsonl``; the shipped model's is models/weights/training_log_v2.jsonl).

    python docs/figures/training_curve.py [--log models/weights/training_log_v2.jsonl] [--out docs/img/default_model_v2_training.png]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_validations(log: Path) -> list:
    """The log's validation records, one per step (a repeated closing validation at the same step dropped)."""
    seen = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "val":
            seen[record["step"]] = record
    return [seen[s] for s in sorted(seen)]


def main(argv=None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--log", type=Path, default=ROOT / "models/weights/training_log_v2.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "docs/img/default_model_v2_training.png")
    args = p.parse_args(argv)
    vals = read_validations(args.log)
    steps = [v["step"] for v in vals]
    best = [v for v in vals if v["best"]][-1]
    fig, (ax_psnr, ax_peak) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_psnr.plot(steps, [v["val_hole_psnr"] for v in vals], "o-", label="hole PSNR (dB)")
    ax_psnr.set_xlabel("optimiser step")
    ax_psnr.set_ylabel("validation hole PSNR (dB)")
    ax_ssim = ax_psnr.twinx()
    ax_ssim.plot(steps, [v["val_hole_ssim"] for v in vals], "s--", color="tab:green", label="hole SSIM")
    ax_ssim.set_ylabel("validation hole SSIM")
    ax_psnr.axvline(best["step"], color="grey", lw=0.8, ls=":")
    ax_psnr.set_title(f"10 validation photos at 512x680 (best: step {best['step']})", fontsize=9)
    peaks = [v.get("heldout_peak", v["val_peak"]) for v in vals]
    ax_peak.semilogy(steps, peaks, "o-", color="tab:red")
    ax_peak.axhline(100, color="grey", lw=0.8, ls="--")
    ax_peak.text(steps[0], 110, "target 100", fontsize=8, color="grey")
    ax_peak.set_xlabel("optimiser step")
    ax_peak.set_ylabel("largest convolution output")
    ax_peak.set_title("export's held-out samples at 1024x1360", fontsize=9)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    for v, peak in zip(vals, peaks):
        print(f"step {v['step']:>6}: hole PSNR {v['val_hole_psnr']:.2f} SSIM {v['val_hole_ssim']:.3f} peak {peak:.1f}"
              f"{' <- shipped' if v is best else ''}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
