"""``gmcnn-mobile golden`` and ``gmcnn-mobile compare``: golden bundles for checking device outputs."""
from __future__ import annotations

import argparse
import sys

from .cli import HelpFormatter, comma_list, int_at_least


def register(subparsers) -> None:
    from .inpaint_cli import add_skip_check_flag

    g = subparsers.add_parser(
        "golden", formatter_class=HelpFormatter,
        help="write inputs + expected outputs of every exported artifact for device unit tests",
        description="Run every artifact of an export directory on this machine (TFLite in LiteRT, Core ML in "
                    "real Core ML on macOS or the reference executor elsewhere) on fixed sample inputs, and "
                    "write a bundle an iOS/Android test can load without Python: PNG for 8-bit images, raw "
                    "little-endian buffers otherwise, index.json with shapes, dtypes, layouts and tolerances.",
    )
    g.add_argument("--artifacts", required=True, metavar="DIR", help="export directory (with manifest.json)")
    g.add_argument("--out", required=True, metavar="BUNDLE", help="bundle folder to write (replaced atomically)")
    g.add_argument("--cases", type=int_at_least(1), default=1, help="input cases per artifact")
    g.add_argument("--seed", type=int, default=0, help="seed of the sample masks (and synthetic photos)")
    g.add_argument("--photos", metavar="DIR", default=None,
                   help="photos to use as inputs (resized to each artifact's shape); default: synthetic photo-like images")
    g.add_argument("--no-pipeline", action="store_true", help="skip the sample pipeline run's stages")
    g.add_argument("--threads", type=int_at_least(1), default=None, help="runtime threads (TFLite/ONNX Runtime)")
    add_skip_check_flag(g)
    g.set_defaults(func=_golden)

    c = subparsers.add_parser(
        "compare", formatter_class=HelpFormatter,
        help="check device outputs against a golden bundle",
        description="Compare outputs produced elsewhere (a phone, a Mac) with a golden bundle. DEVICE_OUTPUTS "
                    "holds each output at the same relative path as the bundle's expected file "
                    "(e.g. <folder>/case0/expected/output.png), in the same encoding; each artifact has its own "
                    "folder, so iOS and Android outputs can share one DEVICE_OUTPUTS. Prints one row per "
                    "output: max abs difference, PSNR, NaN/Inf count, pass/fail, the tolerance, and the tolerance "
                    "that would have passed. Exits 0 when every selected output passes, 1 if any fails or is "
                    "missing, 2 for a malformed bundle or an empty selection.",
    )
    c.add_argument("bundle", metavar="BUNDLE")
    c.add_argument("device_outputs", metavar="DEVICE_OUTPUTS")
    c.add_argument("--format", dest="formats", type=comma_list, default=[], metavar="F[,F]",
                   help="compare only artifacts of these formats (tflite, coreml, onnx); default: all")
    c.add_argument("--precision", dest="precisions", type=comma_list, default=[], metavar="P[,P]",
                   help="compare only artifacts of these precisions (e.g. fp16,int8); default: all")
    c.add_argument("--artifact", dest="names", action="append", default=[], metavar="GLOB",
                   help="compare only artifacts whose file name matches GLOB (repeatable); default: all")
    c.add_argument("--json", dest="json_out", metavar="FILE", default=None,
                   help="also write the rows as strict JSON (no NaN/Infinity; see docs/COREML.md)")
    c.set_defaults(func=_compare)


def _golden(args: argparse.Namespace) -> int:
    from .golden import write_bundle

    out = write_bundle(args.artifacts, args.out, cases=args.cases, seed=args.seed, photos_dir=args.photos,
                       pipeline=not args.no_pipeline, threads=args.threads, verify=not args.allow_modified_artifacts)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"golden bundle: {out} ({size / 1e6:.2f} MB)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from .golden import compare_bundle, format_table, rows_to_json
    from .imageio import check_output_file, write_bytes_atomic

    if args.json_out:
        check_output_file(args.json_out, "--json file")  # a folder, a missing parent, no permission: before comparing
    rows = compare_bundle(args.bundle, args.device_outputs, args.formats, args.precisions, args.names)
    if args.json_out:
        selection = {"formats": args.formats, "precisions": args.precisions, "artifacts": args.names}
        write_bytes_atomic(args.json_out, rows_to_json(rows, bundle=str(args.bundle),
                                                       device_outputs=str(args.device_outputs),
                                                       selection=selection).encode())
    print(format_table(rows))
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)}/{len(rows)} outputs pass")
    if failed:
        print(f"gmcnn-mobile compare: {len(failed)} output(s) failed", file=sys.stderr)
        return 1
    return 0
