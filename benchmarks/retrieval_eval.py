"""Retrieval evaluation cost against one bare matrix product of the same sizes.

    python benchmarks/retrieval_eval.py --sizes 2000x10000 20000x100000 --out bench_retrieval.json

For each gallery of N images x M captions (random unit vectors, 5 captions an image)
it times, in a fresh subprocess each so peak memory is clean:
  - the bare product ``img @ txt.T`` (the N x M matrix, what a naive evaluation holds),
  - ``retrieval_metrics`` (chunked similarity with a running top-k, both directions),
and reports the ratio of the two times (the target is <= 2; two passes, i2t and t2i,
are in it) and the peak RSS above the embeddings themselves.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _child(kind: str, n: int, m: int, dim: int, chunk: int) -> dict:
    import torch

    from vlmtune.metrics.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(m, dim, generator=g), dim=-1)
    t2i = torch.arange(m) % n
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if kind == "matmul":
        out = img @ txt.T
        del out
    else:
        retrieval_metrics(img, txt, t2i, chunk_size=chunk)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"wall_s": wall, "peak_above_embeddings_mb": (peak - base) / 1024}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2000x10000", "5000x25000"], help="NxM galleries")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--out", default=None, help="write JSON here")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, n, m, chunk = args.child
        print(json.dumps(_child(kind, int(n), int(m), args.dim, int(chunk))))
        return 0
    rows = []
    for size in args.sizes:
        n, m = (int(x) for x in size.lower().split("x"))
        res = {}
        for kind in ("matmul", "retrieval_metrics"):
            cmd = [sys.executable, __file__, "--dim", str(args.dim), "--child", kind, str(n), str(m), str(args.chunk)]
            res[kind] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        row = {"images": n, "captions": m, "dim": args.dim, "chunk": args.chunk,
               "matmul_s": round(res["matmul"]["wall_s"], 3), "eval_s": round(res["retrieval_metrics"]["wall_s"], 3),
               "ratio": round(res["retrieval_metrics"]["wall_s"] / res["matmul"]["wall_s"], 2),
               "matmul_peak_mb": round(res["matmul"]["peak_above_embeddings_mb"], 1),
               "eval_peak_mb": round(res["retrieval_metrics"]["peak_above_embeddings_mb"], 1)}
        rows.append(row)
        print(f"{n:>7} x {m:<7}  matmul {row['matmul_s']:8.2f}s  eval {row['eval_s']:8.2f}s  ratio {row['ratio']:5.2f}  "
              f"peak: matmul {row['matmul_peak_mb']:8.1f} MB, eval {row['eval_peak_mb']:7.1f} MB")
    if args.out:
        import torch

        with open(args.out, "w") as f:
            json.dump({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
