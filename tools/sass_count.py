"""Compile the quantize kernel offline for sm_90 and count its SASS instructions: no GPU needed
(Triton's bundled ptxas and cuobjdump). The fast path only: IEEE division's slow-path subroutine
and the blocks that branch to it are left out. docs/RESULTS.md's instruction counts.

    python tools/sass_count.py            # X (rowwise values + columnwise bytes) and dY (both values, SR)
"""
import subprocess, sys, os, collections, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
NV = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")

def compile_count(fn, sig, const, num_warps=4, elements=None, name="k", show=False):
    sig = dict(sig)
    for kk in const: sig[kk] = "constexpr"
    names = list(sig)
    # what the JIT specializes at run time: pointers and ints divisible by 16 (all our shapes)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n not in const and (sig[n].startswith("*") or sig[n] in ("i32", "i64"))}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    c = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    path = f"/tmp/{name}.cubin"
    open(path, "wb").write(c.asm["cubin"])
    sass = subprocess.run([f"{NV}/cuobjdump", "-sass", path], capture_output=True, text=True).stdout
    open(f"/tmp/{name}.sass", "w").write(sass)
    open(f"/tmp/{name}.ttgir", "w").write(c.asm["ttgir"])
    lines = [(int(m.group(1), 16), l.split("*/")[1].strip()) for l in sass.splitlines()
             if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/", l))]
    # the fast path: drop the subroutines after the last EXIT and the blocks a predicated forward
    # branch skips to reach a CALL of them (IEEE division's slow path)
    last_exit = max(i for i, (_, t) in enumerate(lines) if re.sub(r"^@!?U?P\w+\s+", "", t).startswith("EXIT"))
    lines = lines[:last_exit + 1]
    skip = set()
    for i, (addr, t) in enumerate(lines):
        m = re.match(r"@!?P\d BRA (0x[0-9a-f]+)", t)
        if m:
            target = int(m.group(1), 16)
            block = [j for j in range(i + 1, len(lines)) if lines[j][0] < target]
            if any("CALL" in lines[j][1] for j in block):
                skip.update(block)
    ins = [t for i, (_, t) in enumerate(lines) if i not in skip]
    ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0].split(".")[0] for i in ins)
    n = len(ins)
    regs = re.search(r"REG:(\d+)", subprocess.run([f"{NV}/cuobjdump", "-res-usage", path], capture_output=True, text=True).stdout)
    line = f"{name}: {n} SASS, regs {regs.group(1) if regs else '?'}, smem {c.metadata.shared}"
    if elements:
        line += f", {n * num_warps * 32 / elements:.1f} per element (thread-instr), {n*num_warps/elements:.3f} warp-instr/el"
    print(line)
    if show:
        print("  ", ", ".join(f"{k} {v}" for k, v in ops.most_common(25)))
    return n


if __name__ == "__main__":
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    import nvfp4.kernels as k
    sig = {"x_ptr": "*bf16", "amax_ptr": "*fp32", "bits_ptr": "*fp32", "seed_ptr": "*i64",
           "row_values_ptr": "*bf16", "row_data_ptr": "*u8", "row_scale_ptr": "*u8",
           "col_values_ptr": "*bf16", "col_data_ptr": "*u8", "col_scale_ptr": "*u8",
           "deq_out_ptr": "*bf16", "rows": "i32", "cols": "i32"}
    base = dict(ROW_VALUES=True, ROW_PACKED=False, COL_VALUES=False, COL_PACKED=True, RHT=True, TILE_ROWS=1,
                RANDOM=0, FOUR_OVER_SIX=0, E4M3_MAX=448, ROW_SCALED=False, DEQUANT=False, BLOCK_C=128, PDL=True)
    for name, cfg in (("x", base), ("dy", dict(base, COL_VALUES=True, COL_PACKED=False, RANDOM=2))):
        compile_count(k._quantize_kernel, sig, cfg, elements=16 * 128, name="quantize_" + name, show=True)
