"""workbench/benchmark.py, profile.py, kernel_bench.py on CPU: the memory parts, --profile's kernel
groups and per-step summary, kernel_bench's GEMM shapes."""
import pytest
import torch

import asmae_minimal
from workbench.kernel_bench import layer_shapes
from workbench.profile import kernel_group, report_lines, summarize
from workbench import benchmark


@pytest.mark.parametrize("name, group", [
    ("_quantize_kernel", "quantize"), ("_amax_kernel", "quantize"), ("_unpack_kernel", "quantize"),
    ("_fp8_kernel", "quantize"), ("_scaled_mm_kernel", "GEMM"), ("nvjet_sm90_tst_128x256_64x4_1x4_h_bz_coopA_NNN", "GEMM"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "GEMM"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),  # wgmma: not a GEMM
    ("pytorch_flash::flash_fwd_kernel", "attention"), ("triton_poi_fused_gelu_view_8", "fused elementwise"),
    ("triton_per_fused__to_copy_add_native_layer_norm_7", "fused elementwise"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("void at::native::lpnorm_cleanup<float>", "optimizer"), ("Memset (Device)", "copy / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, add>", "eager elementwise"), ("mystery", "other")])
def test_kernels_fall_in_their_group(name, group):
    assert kernel_group(name) == group


def test_profile_summary_is_per_step_and_ranked():
    steps = 20
    kernels = [("_quantize_kernel", 3000 * steps, 50 * steps), ("_scaled_mm_kernel", 1500 * steps, 40 * steps),
               ("nvjet_sm90_x", 500 * steps, 10 * steps), ("triton_poi_fused_add_0", 250 * steps, 5 * steps)]
    summary = summarize(kernels, steps, top=3)
    assert summary["total_ms"] == pytest.approx(5.25)
    assert summary["groups_ms"] == pytest.approx({"quantize": 3.0, "GEMM": 2.0, "fused elementwise": 0.25})
    assert list(summary["groups_ms"]) == ["quantize", "GEMM", "fused elementwise"]
    assert [name for name, *_ in summary["top"]] == ["_quantize_kernel", "_scaled_mm_kernel", "nvjet_sm90_x"]
    assert summary["top"][0][2:] == pytest.approx((3.0, 50.0))
    lines = report_lines(summary, steps)
    assert lines[0].startswith("20 steps profiled: 5.250 ms") and any("57.1%" in line for line in lines)


def test_kernel_bench_shapes_are_the_quantized_gemms_of_the_model():
    """small at 32 px / patch 4 / batch 512: 16 + 1 encoder tokens, 64 + 1 decoder tokens a sample;
    the model's own list of quantized GEMMs (patch_embed and decoder_pred stay high precision)."""
    shapes = layer_shapes("small", 512, 32, 4)
    assert ("enc.fc1", 6, 512 * 17, 384, 1536) in shapes and ("dec.qkv", 4, 512 * 65, 192, 576) in shapes
    model = asmae_minimal.MAE(asmae_minimal.MAEConfig(**asmae_minimal.MODEL_PRESETS["small"]))
    quantized = [(i, o) for name, i, o, _ in model.gemms if name not in ("patch_embed", "decoder_pred")]
    expected = sorted(q for _, count, m, k, n in shapes for q in [(k, n)] * count)
    assert sorted(quantized) == expected


def test_profile_needs_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:
        asmae_minimal.main(["--profile", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--profile needs --benchmark N" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["fp32", "nvfp4"])
def test_memory_parts_of_the_benchmark_report(precision):
    """--benchmark's memory lines: parameters, gradients and AdamW's two moments (plus its step
    counters) make the static part; the linear layers' saved copies are those of one forward."""
    _, config = asmae_minimal.parse_config(["--device", "cpu", "--model", "tiny", "--precision", precision,
                                            "--batch-size", "16", "--no-compile"])
    step = asmae_minimal.TrainStep(config, torch.device("cpu"))
    m = config.model
    batch = (torch.randn(16, 3, m.img_size, m.img_size), torch.rand(16, m.num_patches))
    step(*batch, 1e-4, 1)  # the optimizer's state exists after its first step
    parts = benchmark.memory_parts(step, batch)
    param_bytes = sum(p.numel() * 4 for p in step.model.parameters())
    assert parts["params_gib"] * 2 ** 30 == parts["grads_gib"] * 2 ** 30 == param_bytes
    counters = 4 * len(list(step.model.parameters()))
    assert parts["optimizer_gib"] * 2 ** 30 == 2 * param_bytes + counters
    assert parts["static_mem_gib"] == pytest.approx(parts["params_gib"] * 2 + parts["optimizer_gib"])
    # every linear layer's x copy: tokens x in elements, kept as copy_bytes says
    def tokens(name):  # the visible patches, then with the cls token; the decoder: every patch + cls
        return 16 * (m.num_visible if name == "patch_embed" else m.num_visible + 1 if name.startswith(
            ("blocks", "decoder_embed")) else m.num_patches + 1)
    def copy_bytes(elements, quantized):  # NVFP4: TE's bytes (codes, E4M3 scales, amax); else fp32
        return elements // 2 + elements // 16 + 4 if quantized else 4 * elements
    gemms = step.model.gemms
    assert parts["saved_x_gib"] * 2 ** 30 == sum(copy_bytes(tokens(name) * k, q) for name, k, _, q in gemms)
    # W for dX: every layer but patch_embed (the pixels need no gradient); W^T copies are W's size
    assert parts["saved_w_gib"] * 2 ** 30 == sum(copy_bytes(k * n, q) for name, k, n, q in gemms if name != "patch_embed")
