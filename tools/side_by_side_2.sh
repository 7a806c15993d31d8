# The side-by-side call of docs/RESULTS.md's fourth issue-31 session (call 3, a device's $OUT): GPU kernel test,
# rows (each a fresh process with empty compile caches; .scratch/before holds `git archive 8e69030`, .scratch/REV the
# commit measured), the eager A/B, the GPU smoke tests.
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
L=$OUT/l; mkdir -p $L; log=$OUT/log.txt
fresh() { export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d) TRITON_CACHE_DIR=$(mktemp -d); }
echo "after: $(cat .scratch/REV)  before: 8e69030" >> $log
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader >> $log
fresh; timeout 190 python -m pytest -q -x tests/test_kernels.py -k gpu > $L/t_kernels.txt 2>&1; echo "test_kernels gpu rc=$? at ${SECONDS}s" >> $log; tail -2 $L/t_kernels.txt >> $log
SMALL="--dataset fake --batch-size 512 --benchmark 150"
BASE="--dataset fake --model base --img-size 224 --patch-size 16 --batch-size 128 --benchmark 30 --benchmark-synthetic"
row() { label=$1; shift; if [ $SECONDS -gt 500 ]; then echo "row $label skipped (time)" >> $log; return; fi
  fresh; timeout 70 "$@" --out-dir $L/r_$label > $L/$label.txt 2>&1; echo "row $label rc=$? at ${SECONDS}s" >> $log; }
row small_bf16 python asmae_minimal.py --precision bf16 $SMALL --benchmark-synthetic
row small_fp8 python asmae_minimal.py --precision fp8 $SMALL --benchmark-synthetic --profile
row small_fp8_before python .scratch/before/asmae_minimal.py --precision fp8 $SMALL --benchmark-synthetic
row small_nvfp4 python asmae_minimal.py --precision nvfp4 $SMALL --benchmark-synthetic
row small_nvfp4_before python .scratch/before/asmae_minimal.py --precision nvfp4 $SMALL --benchmark-synthetic
[ $SECONDS -lt 450 ] && timeout 35 python tools/kernel_variants.py eager-ab 2>&1 | grep -v Warn | grep "eager\|GPU" >> $log
if [ $SECONDS -lt 470 ]; then fresh; timeout $((580 - SECONDS)) python -m pytest -q -x tests/test_gpu_smoke.py > $L/t_smoke.txt 2>&1; echo "gpu smoke tests rc=$? at ${SECONDS}s" >> $log; tail -2 $L/t_smoke.txt >> $log; fi
row base_bf16 python asmae_minimal.py --precision bf16 $BASE
row base_fp8 python asmae_minimal.py --precision fp8 $BASE
rm -f $L/r_*/*.json
python - "$L" >> $log <<'PY'
import json, sys, glob, os
for path in sorted(glob.glob(sys.argv[1] + "/r_*/benchmarks.jsonl")):
    r = json.loads(open(path).readlines()[-1])
    print(f"{os.path.basename(os.path.dirname(path))[2:]:20s} step {r['step_ms']:7.3f} ms  img/s {r['img_per_s']:9.0f}  act {r['activation_mem_gib']:.3f}  static {r['static_mem_gib']:.3f}  saved_x {r['saved_x_gib']:.3f}  warmup {r['warmup_s']:.1f} s  data_wait {r.get('data_wait_pct', 0)}  " + ("groups " + ", ".join(f"{k} {v:.3f}" for k, v in r.get("profile_ms", {}).items()) if "profile_ms" in r else ""))
PY
grep -h "\[profile\]" $L/small_fp8.txt | grep -v "Chrome" | head -24 >> $log
tar czf $OUT/logs.tgz -C $OUT l
cat $log
