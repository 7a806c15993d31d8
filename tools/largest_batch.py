"""The largest batch whose benchmark step fits the GPU, by bisection (docs/RESULTS.md): each probe a
fresh `asmae_minimal.py --benchmark 1 --benchmark-synthetic` process (compile, CUDA-graph capture,
20 warm-up steps, one timed); a probe fits when it exits 0, and fails on an out-of-memory error.
Batches step by 16 (the GEMM shape rules); the search starts from a guess and its bracket.

    python tools/largest_batch.py --precision nvfp4 --guess 4096 --probes 3 -- --model base --img-size 224 --patch-size 16
"""
import argparse, subprocess, sys, tempfile, time


def probe(precision: str, batch: int, extra: list, log) -> bool:
    """Whether one benchmark step of `batch` fits; any failure but out-of-memory stops the search."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "asmae_minimal.py", "--precision", precision, "--dataset", "fake",
               "--batch-size", str(batch), "--benchmark", "1", "--benchmark-synthetic", "--out-dir", out, *extra]
        t0 = time.time()
        result = subprocess.run(cmd, capture_output=True, text=True)
    text = result.stdout + result.stderr
    oom = "out of memory" in text.lower() or "OutOfMemoryError" in text
    peak = [line.split()[-1] for line in result.stdout.splitlines() if "peak_mem_gib" in line]
    print(f"{precision} batch {batch}: {'fits' if result.returncode == 0 else 'OOM' if oom else 'error'} "
          f"({time.time() - t0:.0f} s{', peak ' + peak[0] + ' GiB' if peak else ''})", file=log, flush=True)
    if result.returncode != 0 and not oom:
        raise SystemExit(f"batch {batch} failed, not for memory:\n{text[-2000:]}")
    return result.returncode == 0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", required=True)
    parser.add_argument("--guess", type=int, required=True, help="a batch near the largest (e.g. from memory per sample)")
    parser.add_argument("--bracket", type=float, default=0.12, help="search guess x (1 +- bracket)")
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("extra", nargs="*", help="more flags for asmae_minimal.py, after --")
    args = parser.parse_args()
    step = lambda b: max(16, int(b) // 16 * 16)
    lo, hi = step(args.guess * (1 - args.bracket)), step(args.guess * (1 + args.bracket))  # assumed fit / OOM
    for _ in range(args.probes):
        mid = step((lo + hi) / 2)
        if mid in (lo, hi):
            break
        if probe(args.precision, mid, args.extra, sys.stdout):
            lo = mid
        else:
            hi = mid
    print(f"{args.precision}: largest batch in [{lo}, {hi}) (the ends assumed, not probed, unless printed above)")


if __name__ == "__main__":
    main()
