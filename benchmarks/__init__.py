"""fastadv's benchmarks: fused step kernels, whole attacks, and the results they write.

Run from the repository root; the same package is installed with fastadv as
``fastadv.bench`` (what ``fastadv bench`` uses), so its modules import each other
relatively:

    python -m benchmarks.bench_kernels      # step ops vs the eager reference chain, GB/s
    python -m benchmarks.bench_attacks      # attacks vs torchattacks / pyautoattack, ratio to the floor
    python -m benchmarks.plot FILE.json     # bar chart of attack times

Results land in benchmarks/results/<device-slug>.json and .md (see results.py).
Importing any module here needs no GPU and downloads nothing.
"""
