"""A folder of random RGB PNGs in the ImageNet layout (root/<class>/<image>.png), for the
streaming memory and throughput benchmark. Write it outside the repository (never commit
the images):

    .venv/bin/python -m benchmarks.make_image_folder /tmp/folder-40k --images 40000 [--size 64] [--classes 10]

Pixels: smooth random colour fields plus noise (numpy seeded with --seed), so files
have a realistic size (about 10 KB at 64x64) and decode like photographs, not flat images.
"""
import argparse
import os
from multiprocessing import Pool

import numpy as np


def _write(job):
    root, size, classes, seed, start, stop = job
    from PIL import Image

    rng = np.random.default_rng([seed, start])
    for i in range(start, stop):
        coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
        field = np.kron(coarse, np.ones((size // 4, size // 4, 1), np.float32))
        img = np.clip(field + rng.normal(0, 24, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img, "RGB").save(os.path.join(root, f"class_{i % classes:03d}", f"{i:07d}.png"))
    return stop - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--images", type=int, required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--procs", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    if os.path.exists(args.root):
        raise SystemExit(f"{args.root} exists; pick a new folder")
    for c in range(args.classes):
        os.makedirs(os.path.join(args.root, f"class_{c:03d}"))
    chunk = 1000
    jobs = [(args.root, args.size, args.classes, args.seed, s, min(s + chunk, args.images))
            for s in range(0, args.images, chunk)]
    with Pool(args.procs) as pool:
        n = sum(pool.imap_unordered(_write, jobs))
    print(f"wrote {n} images of 3x{args.size}x{args.size} to {args.root}")


if __name__ == "__main__":
    main()
