#!/bin/bash
# The side-by-side call of docs/RESULTS.md (a device's $OUT): GPU kernel test, then each benchmark row a
# fresh process with empty compile caches; .scratch/before holds `git archive e63415d` (the before tree),
# .scratch/REV the commit measured.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
mkdir -p $OUT/l; L=$OUT/l; log=$OUT/log.txt
fresh() { export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d); }
git_rev=$(cat .scratch/REV 2>/dev/null); echo "code: $git_rev" >> $log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader >> $log
fresh; timeout 75 python -m pytest -q -x tests/test_kernels.py -k gpu > $L/t_kernels.txt 2>&1; echo "test_kernels gpu rc=$?" >> $log
grep -E "AssertionError: \(|passed|failed" $L/t_kernels.txt | head -4 >> $log
SMALL="--dataset fake --batch-size 512 --benchmark 200"
BASE="--dataset fake --model base --img-size 224 --patch-size 16 --batch-size 128 --benchmark 30 --benchmark-synthetic"
row() { label=$1; shift; if [ $SECONDS -gt 440 ]; then echo "row $label skipped (time)" >> $log; return; fi
  fresh; timeout 75 "$@" --out-dir $L/r_$label > $L/$label.txt 2>&1; echo "row $label rc=$? at ${SECONDS}s" >> $log; }
row small_bf16 python asmae_minimal.py --precision bf16 $SMALL --benchmark-synthetic
row small_nvfp4 python asmae_minimal.py --precision nvfp4 $SMALL --benchmark-synthetic --profile
row small_fp8 python asmae_minimal.py --precision fp8 $SMALL --benchmark-synthetic --profile
row small_nvfp4_before python .scratch/before/asmae_minimal.py --precision nvfp4 $SMALL --benchmark-synthetic
row base_bf16 python asmae_minimal.py --precision bf16 $BASE
row base_nvfp4 python asmae_minimal.py --precision nvfp4 $BASE
row base_fp8 python asmae_minimal.py --precision fp8 $BASE
row e2e_nvfp4 python asmae_minimal.py --precision nvfp4 $SMALL
row e2e_bf16 python asmae_minimal.py --precision bf16 $SMALL
row small_4over6 python asmae_minimal.py --precision nvfp4 $SMALL --benchmark-synthetic --no-rht --nvfp4-4over6 all
[ $SECONDS -lt 480 ] && timeout 25 python -m workbench.kernel_bench --eager-layer 8704,384,1152 > $L/eager.txt 2>&1; tail -1 $L/eager.txt >> $log
if [ $SECONDS -lt 470 ]; then fresh; timeout $((530 - SECONDS)) python -m pytest -q -x tests/test_linear.py tests/test_te_parity.py tests/test_gpu_smoke.py -k "cuda or gpu or smoke or graph or benchmark" > $L/t_layers.txt 2>&1; echo "layer/parity/smoke gpu tests rc=$?" >> $log; tail -2 $L/t_layers.txt >> $log; fi
rm -f $L/r_*/*.json
python - "$L" >> $log <<'PY'
import json, sys, glob, os
for path in sorted(glob.glob(sys.argv[1] + "/r_*/benchmarks.jsonl")):
    r = json.loads(open(path).readlines()[-1])
    print(f"{os.path.basename(os.path.dirname(path))[2:]:20s} step {r['step_ms']:7.3f} ms  img/s {r['img_per_s']:9.0f}  act {r['activation_mem_gib']:.3f}  static {r['static_mem_gib']:.3f}  saved_x {r['saved_x_gib']:.3f}  peak {r['peak_mem_gib']:.3f}  warmup {r['warmup_s']:.1f} s  " + ("groups " + ", ".join(f"{k} {v:.3f}" for k, v in r.get("profile_ms", {}).items()) if "profile_ms" in r else ""))
PY
grep -h "\[profile\]" $L/small_nvfp4.txt $L/small_fp8.txt | grep -v "group  \|Chrome" | head -40 >> $log
tar czf $OUT/logs.tgz -C $OUT l
cat $log
