"""An app developer's test of a golden bundle, written from docs/COREML.md and docs/MANIFEST.md only.

    python app_consumer.py BUNDLE EXPORT_DIR DEVICE_OUTPUTS

No gmcnn-mobile code: json, hashlib, numpy, Pillow (PNG) and LiteRT, as an Android test would
use the index, BitmapFactory and the Interpreter. For every artifact in BUNDLE/index.json it
recomputes the file's sha256 as docs/MANIFEST.md "Artifact hash" says and checks it against the
index; every TFLite artifact it then runs the way Android's index-based
``Interpreter.runForMultipleInputsOutputs`` does -- case input ``i`` into model input ``i`` --
and writes each output where the docs say (DEVICE_OUTPUTS/<expected file>, PNG for 8-bit
images, raw little-endian otherwise). Prints one line per artifact; exits non-zero on any
mismatch. `gmcnn-mobile compare BUNDLE DEVICE_OUTPUTS --format tflite` then judges the outputs.
"""
import hashlib
import json
import os
import sys

import numpy as np
from PIL import Image

PROJECT_PACKAGES = ("runtime_py", "export", "models", "benchmarks")


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def package_sha256(root):
    """The directory recipe: sha256sum-style lines, files sorted by UTF-8 path bytes, '/' separators."""
    paths = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            paths.append(os.path.relpath(full, root).replace(os.sep, "/").encode("utf-8"))
    lines = b"".join(file_sha256(os.path.join(root, p.decode("utf-8"))).encode() + b"  " + p + b"\n"
                     for p in sorted(paths))
    return hashlib.sha256(lines).hexdigest()


def load(bundle, entry):
    path = os.path.join(bundle, entry["file"])
    shape = tuple(entry["shape"])
    if entry["encoding"] == "png":
        pixels = np.asarray(Image.open(path))
        return pixels.reshape(shape)  # (1,H,W,C): the batch axis and a grey channel axis come back
    return np.fromfile(path, dtype=np.dtype(entry["dtype"]).newbyteorder("<")).reshape(shape)


def save(root, entry, array):
    path = os.path.join(root, entry["file"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if entry["encoding"] == "png":
        hwc = array.reshape(array.shape[-3:])
        Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc, "L" if hwc.shape[2] == 1 else "RGB").save(path)
    else:
        array.astype(np.dtype(entry["dtype"]).newbyteorder("<")).tofile(path)


def main(bundle, export_dir, device_dir):
    from ai_edge_litert.interpreter import Interpreter

    with open(os.path.join(bundle, "index.json")) as f:
        index = json.load(f)
    assert index["schema"] == 2, index["schema"]
    folders = [a["folder"] for a in index["artifacts"]]
    assert len(folders) == len(set(folders)), folders
    ran = 0
    for art in index["artifacts"]:
        model = os.path.join(export_dir, art["artifact"])
        digest = file_sha256(model) if os.path.isfile(model) else package_sha256(model)
        assert digest == art["sha256"], (art["artifact"], digest, art["sha256"])
        if art["format"] != "tflite":
            print(f"{art['artifact']}: sha256 ok, not run here (needs Core ML)")
            continue
        interpreter = Interpreter(model_path=model)
        interpreter.allocate_tensors()
        inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
        # the documented order (image, mask), at input positions 0, 1 -- and tensor indices 0, 1 too
        assert [d["name"] for d in inputs] == ["image", "mask"], inputs
        assert [d["index"] for d in inputs] == [0, 1], [d["index"] for d in inputs]
        for case in art["cases"]:
            assert [e["name"] for e in case["inputs"]] == ["image", "mask"], case["inputs"]
            for i, entry in enumerate(case["inputs"]):  # by position, as runForMultipleInputsOutputs
                x = load(bundle, entry)
                assert list(x.shape) == list(inputs[i]["shape"]) and x.dtype == inputs[i]["dtype"], (entry, inputs[i])
                interpreter.set_tensor(inputs[i]["index"], x)
            interpreter.invoke()
            for j, entry in enumerate(case["expected"]):
                save(device_dir, entry, interpreter.get_tensor(outputs[j]["index"]))
        ran += 1
        print(f"{art['artifact']}: sha256 ok, {len(art['cases'])} case(s) run and written")
    imported = sorted(m for m in sys.modules if m.split(".")[0] in PROJECT_PACKAGES)
    assert not imported, imported
    print(f"ran {ran} TFLite artifact(s)")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
