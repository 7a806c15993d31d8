"""One layer's quantization operands for Nsight Compute (docs/RESULTS.md):
    ncu --clock-control none -k regex:"_quantize_kernel|_amax_kernel|_unpack_kernel|_fp8_kernel" \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
        python tools/ncu_target.py
"""
import sys, torch; sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from nvfp4 import kernels
from nvfp4.kernels import PACKED, VALUES
seed = torch.tensor([7], device="cuda"); none = torch.empty(0, dtype=torch.int64, device="cuda")
for m, k, n in ((8704, 384, 1536), (33280, 192, 576)):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16); dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
    out = torch.ops.nvfp4.quantize(x, none, 1, VALUES, PACKED, True, False)
    torch.ops.nvfp4.quantize(dy, seed, 1, VALUES, VALUES, True, True)
    torch.ops.nvfp4.unpack(out[4], out[5])
    torch.ops.nvfp4.quantize_fp8(dy, 1, True, True)
torch.cuda.synchronize()
