"""Peak memory of one model run at a given shape, each in its own process (the high-res pass
whole vs one of its tiles).

    python docs/pipeline/pass_memory.py CHECKPOINT 1024x1360 512x680 [--threads N]

For each shape a fresh interpreter loads the checkpoint with the torch engine, records its
resident memory (``ru_maxrss`` so far), runs one inference on a random image with a centred
hole, and reports the new peak. The difference is what the run itself needs.
"""
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import numpy as np
from runtime_py.engines.torch_engine import TorchEngine
ckpt, rows, cols, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
eng = TorchEngine((rows, cols), checkpoint=ckpt, threads=threads).activate()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rng = np.random.default_rng(0)
img = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8)
hole = np.zeros((rows, cols), bool); hole[rows // 4: 3 * rows // 4, cols // 4: 3 * cols // 4] = True
t0 = time.perf_counter(); eng.inpaint(img, hole); dt = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"shape": [rows, cols], "rss_loaded_mib": round(before, 1), "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),
                  "run_mib": round(ru.ru_maxrss / 1024 - before, 1), "seconds": round(dt, 2),
                  "cpu_s": round(ru.ru_utime + ru.ru_stime, 1)}))
"""


def main():
    args = sys.argv[1:]
    threads = "2"
    if "--threads" in args:
        i = args.index("--threads")
        threads = args[i + 1]
        del args[i:i + 2]
    ckpt, shapes = args[0], args[1:]
    for s in shapes:
        rows, cols = s.split("x")
        r = subprocess.run([sys.executable, "-c", CHILD, ckpt, rows, cols, threads], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-2000:])
        print(json.dumps(json.loads(r.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
