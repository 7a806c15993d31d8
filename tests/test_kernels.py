"""The fused Triton NVFP4 kernel equals the PyTorch reference bit for bit: on the GPU, and on
the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported)."""
import os
import subprocess
import sys

import pytest

from conftest import REPO, requires_cuda

CHECK = r"""
import sys, torch
sys.path.insert(0, {repo!r})
from nvfp4 import kernels
from nvfp4.formats import quantize_nvfp4, random_bits
device = {device!r}
g = torch.Generator(device).manual_seed(0)
cases = 0
for dtype in (torch.float32, torch.bfloat16):
    for tile in (1, 16):
        for rows, cols in ((64, 128), (48, 96), (40, 32), (16, 1152)):
            if rows % tile:
                continue
            x = (torch.randn(rows, cols, generator=g, device=device) *
                 torch.logspace(-4, 4, cols, device=device)).to(dtype)
            x[0, :16] = 0
            x[1, 16:32] = -1e-30
            for stochastic in (False, True):
                bits = random_bits(x.shape, device, g) if stochastic else None
                ref = quantize_nvfp4(x, tile_rows=tile, stochastic=stochastic, bits=bits)
                out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
                kernels.launch(x, ref.amax.reshape(1), bits, out, tile)
                expected = ref.values()
                same = torch.equal(out.float().view(torch.int32), expected.view(torch.int32))
                assert same, (dtype, tile, rows, cols, stochastic, (out.float() != expected).sum().item())
                cases += 1
for special in (float("inf"), float("nan")):
    x = torch.randn(32, 64, device=device)
    x[3, 7] = special
    ref = quantize_nvfp4(x)
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    kernels.launch(x, ref.amax.reshape(1), None, out, 1)
    assert torch.equal(out.float().isnan(), ref.values().isnan())
    assert torch.equal(out.float().nan_to_num(), ref.values().nan_to_num())
print("bitwise", cases)
"""


def test_kernel_bitwise_in_triton_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO), device="cpu")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bitwise 28" in result.stdout


@requires_cuda
def test_kernel_bitwise_on_gpu():
    result = subprocess.run([sys.executable, "-c", CHECK.format(repo=str(REPO), device="cuda")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "bitwise 28" in result.stdout
