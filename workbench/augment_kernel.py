"""augment.py's crop, flip, resize, colour jitter and normalization in one Triton kernel (GPU).

One kernel instead of torch.compile's fusion of augment.py's ops, which took a large share of a
cold start (docs/RESULTS.md: Speed history, "Compile"). One program per image: it samples the
crop (affine_grid + grid_sample, bilinear, border padding, inside the crop box), applies the
four jitter ops in the sample's own order, and normalizes. Contrast blends towards the image's
mean gray at its position in the order, so a first pass over the image computes that mean and a
second applies all four ops. Images larger than one tile loop over tiles, recomputing rather
than storing. augment.py stays the specification and the CPU path; tests/test_augment.py checks
this kernel against it on the GPU and through Triton's CPU interpreter.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK = 1024  # pixels per tile: a 32 x 32 image is one tile


@triton.jit
def _gray(r, g, b):
    return 0.2989 * r + 0.587 * g + 0.114 * b


@triton.jit
def _blend(x, other, factor):
    return tl.clamp(factor * x + (1 - factor) * other, 0.0, 1.0)


@triton.jit
def _mod1(x):
    return x - tl.floor(x)  # torch's remainder by 1 (Triton's % keeps the dividend's sign)


@triton.jit
def _sector(i, s0, s1, s2, s3, s4, s5):
    return tl.where(i == 0, s0, tl.where(i == 1, s1, tl.where(i == 2, s2, tl.where(i == 3, s3, tl.where(i == 4, s4, s5)))))


@triton.jit
def _adjust_hue(r, g, b, shift):
    """augment._adjust_hue: RGB -> HSV, rotate the hue, HSV -> RGB."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    delta = maxc - tl.minimum(tl.minimum(r, g), b)
    safe = tl.where(delta > 0, delta, 1.0)
    sat = delta / tl.where(maxc > 0, maxc, 1.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = tl.where(maxc == r, bc - gc, tl.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = tl.where(delta > 0, _mod1(h / 6.0), 0.0)
    h = _mod1(h + shift)
    i = tl.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.to(tl.int32) % 6
    p, q, t = maxc * (1 - sat), maxc * (1 - sat * f), maxc * (1 - sat * (1 - f))
    return (_sector(i, maxc, q, p, p, t, maxc), _sector(i, t, maxc, maxc, q, p, p),
            _sector(i, p, p, t, maxc, maxc, q))


@triton.jit
def _jitter_op(r, g, b, op, factor, mean_gray):
    """One of augment.color_jitter's ops: 0 brightness, 1 contrast, 2 saturation, 3 hue."""
    if op == 0:
        r, g, b = _blend(r, 0.0, factor), _blend(g, 0.0, factor), _blend(b, 0.0, factor)
    elif op == 1:
        r, g, b = _blend(r, mean_gray, factor), _blend(g, mean_gray, factor), _blend(b, mean_gray, factor)
    elif op == 2:
        gray = _gray(r, g, b)
        r, g, b = _blend(r, gray, factor), _blend(g, gray, factor), _blend(b, gray, factor)
    else:
        r, g, b = _adjust_hue(r, g, b, factor)
    return r, g, b


@triton.jit
def _bilinear(src, ix, iy, valid, H: tl.constexpr, W: tl.constexpr):
    """grid_sample's bilinear interpolation at source pixel coordinates (ix, iy), already clipped
    to the image (border padding); corners outside it weigh zero."""
    x0, y0 = tl.floor(ix), tl.floor(iy)
    fx, fy = ix - x0, iy - y0
    x0, y0 = x0.to(tl.int32), y0.to(tl.int32)
    x1_in, y1_in = x0 + 1 < W, y0 + 1 < H
    nw = tl.load(src + y0 * W + x0, mask=valid, other=0).to(tl.float32) / 255.0
    ne = tl.load(src + y0 * W + x0 + 1, mask=valid & x1_in, other=0).to(tl.float32) / 255.0
    sw = tl.load(src + (y0 + 1) * W + x0, mask=valid & y1_in, other=0).to(tl.float32) / 255.0
    se = tl.load(src + (y0 + 1) * W + x0 + 1, mask=valid & x1_in & y1_in, other=0).to(tl.float32) / 255.0
    return nw * (1 - fx) * (1 - fy) + ne * fx * (1 - fy) + sw * (1 - fx) * fy + se * fx * fy


@triton.jit
def _crop(src_ptr, n, j, valid, top, left, h, w, flip, H: tl.constexpr, W: tl.constexpr, S: tl.constexpr):
    """augment.crop_flip_resize at output pixels j of image n: (r, g, b)."""
    sx = tl.where(flip, -w / W, w / W)
    cx, cy = (2 * left + w) / W - 1, (2 * top + h) / H - 1
    xn = (2 * (j % S) + 1).to(tl.float32) / S - 1  # affine_grid's base grid (align_corners=False)
    yn = (2 * (j // S) + 1).to(tl.float32) / S - 1
    gx = tl.maximum(tl.minimum(sx * xn + cx, (2 * (left + w) - 1) / W - 1), (2 * left + 1) / W - 1)  # in the box
    gy = tl.maximum(tl.minimum(h / H * yn + cy, (2 * (top + h) - 1) / H - 1), (2 * top + 1) / H - 1)
    ix = tl.minimum(tl.maximum(((gx + 1) * W - 1) / 2, 0.0), W - 1.0)  # grid_sample's border padding
    iy = tl.minimum(tl.maximum(((gy + 1) * H - 1) / 2, 0.0), H - 1.0)
    src = src_ptr + n * (3 * H * W)
    return (_bilinear(src, ix, iy, valid, H, W), _bilinear(src + H * W, ix, iy, valid, H, W),
            _bilinear(src + 2 * H * W, ix, iy, valid, H, W))


@triton.jit
def _augment_kernel(src_ptr, out_ptr, top_ptr, left_ptr, h_ptr, w_ptr, flip_ptr, order_ptr, jitter_ptr,
                    mean_ptr, std_ptr, H: tl.constexpr, W: tl.constexpr, S: tl.constexpr,
                    BLOCK: tl.constexpr, NORMALIZE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    top, left = tl.load(top_ptr + n), tl.load(left_ptr + n)
    h, w, flip = tl.load(h_ptr + n), tl.load(w_ptr + n), tl.load(flip_ptr + n)
    order = tl.load(order_ptr + n * 4 + tl.arange(0, 4))
    contrast_at = tl.sum(tl.where(order == 1, tl.arange(0, 4), 0))

    # pass 1: the image's mean gray as the contrast op finds it (after the ops before it)
    gray_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, S * S, BLOCK):
        j = start + tl.arange(0, BLOCK)
        valid = j < S * S
        r, g, b = _crop(src_ptr, n, j, valid, top, left, h, w, flip, H, W, S)
        for k in range(3):
            if k < contrast_at:
                op = tl.load(order_ptr + n * 4 + k)
                r, g, b = _jitter_op(r, g, b, op, tl.load(jitter_ptr + n * 4 + op), 0.0)
        gray_sum += tl.where(valid, _gray(r, g, b), 0.0)
    mean_gray = tl.sum(gray_sum) / (S * S)

    # pass 2: all four ops, normalization, store
    out = out_ptr + n * (3 * S * S)
    for start in range(0, S * S, BLOCK):
        j = start + tl.arange(0, BLOCK)
        valid = j < S * S
        r, g, b = _crop(src_ptr, n, j, valid, top, left, h, w, flip, H, W, S)
        for k in range(4):
            op = tl.load(order_ptr + n * 4 + k)
            r, g, b = _jitter_op(r, g, b, op, tl.load(jitter_ptr + n * 4 + op), mean_gray)
        if NORMALIZE:
            r = (r - tl.load(mean_ptr)) / tl.load(std_ptr)
            g = (g - tl.load(mean_ptr + 1)) / tl.load(std_ptr + 1)
            b = (b - tl.load(mean_ptr + 2)) / tl.load(std_ptr + 2)
        tl.store(out + j, r, mask=valid)
        tl.store(out + S * S + j, g, mask=valid)
        tl.store(out + 2 * S * S + j, b, mask=valid)


def crop_flip_jitter(imgs_uint8: torch.Tensor, p: dict, size: int, mean=None, std=None) -> torch.Tensor:
    """augment.color_jitter(augment.crop_flip_resize(imgs / 255, p, size), p), then (x - mean) / std
    where mean and std (3 channels) are given: float32 [N, 3, size, size]."""
    n, channels, height, width = imgs_uint8.shape
    assert channels == 3 and imgs_uint8.dtype == torch.uint8
    out = torch.empty(n, 3, size, size, device=imgs_uint8.device)
    normalize = mean is not None
    mean, std = (mean.reshape(3).float(), std.reshape(3).float()) if normalize else (out, out)
    _augment_kernel[(n,)](imgs_uint8.contiguous(), out, p["top"], p["left"], p["h"], p["w"], p["flip"],
                          p["jitter_order"].contiguous(), p["jitter"].contiguous(), mean, std,
                          H=height, W=width, S=size, BLOCK=min(MAX_BLOCK, triton.next_power_of_2(size * size)),
                          NORMALIZE=normalize, num_warps=8)
    return out
