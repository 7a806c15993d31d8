"""Per-sample image augmentation on batched tensors, on the GPU or the CPU.

torchvision.transforms.v2 draws one set of parameters per call, i.e. one per batch when it is
called on a batched tensor. Here every sample gets its own parameters, as it does in the PIL
pipeline: `sample_params` draws them from an explicit generator (reproducible per batch; DDP
ranks slice one global draw), and `apply` transforms the whole batch, on the device of the
images and parameters, in a few batched ops that torch.compile can fuse. This file is the
specification and the CPU path; on the GPU the loader runs augment_kernel.py's Triton kernel
for crop, flip, resize and colour jitter (RandAugment stays here, compiled).

Semantics follow torchvision's RandomResizedCrop(scale=(0.6, 1)), RandomHorizontalFlip,
ColorJitter(0.4, 0.4, 0.4, 0.1) (random op order per sample) and RandAugment(num_ops=2,
magnitude=9), applied to float images in [0, 1] instead of PIL uint8 images.
"""
import math

import torch
import torch.nn.functional as F

CROP_SCALE, CROP_RATIO = (0.6, 1.0), (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
RA_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
          "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
RA_NUM_OPS, RA_LEVEL = 2, 9 / 30  # torchvision's magnitude 9 of 31 bins


def _crop_boxes(n: int, height: int, width: int, g: torch.Generator):
    """torchvision RandomResizedCrop.get_params for n samples: 10 tries, then a center crop."""
    area, device = height * width, g.device
    target = area * torch.empty(n, 10, device=device).uniform_(*CROP_SCALE, generator=g)
    log_ratio = torch.empty(n, 10, device=device).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=g)
    w = torch.sqrt(target * torch.exp(log_ratio)).round()
    h = torch.sqrt(target / torch.exp(log_ratio)).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(1, keepdim=True)
    w, h, any_ok = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], ok.any(1)
    ratio = width / height  # fallback: whole image clamped to the ratio range
    fw = float(width if CROP_RATIO[0] <= ratio <= CROP_RATIO[1] else
               (round(height * CROP_RATIO[1]) if ratio > CROP_RATIO[1] else width))
    fh = float(height if CROP_RATIO[0] <= ratio <= CROP_RATIO[1] else
               (round(width / CROP_RATIO[0]) if ratio < CROP_RATIO[0] else height))
    w, h = torch.where(any_ok, w, fw), torch.where(any_ok, h, fh)
    top = torch.floor(torch.rand(n, generator=g, device=device) * (height - h + 1))
    left = torch.floor(torch.rand(n, generator=g, device=device) * (width - w + 1))
    return top, left, h, w


def sample_params(n: int, height: int, width: int, g: torch.Generator, randaugment: bool) -> dict:
    """All random parameters of n samples, drawn in a fixed order from g (on g's device)."""
    top, left, h, w = _crop_boxes(n, height, width, g)
    b, c, s, hue = JITTER
    uniform = lambda lo, hi: torch.empty(n, device=g.device).uniform_(lo, hi, generator=g)
    params = {
        "top": top, "left": left, "h": h, "w": w,
        "flip": torch.rand(n, generator=g, device=g.device) < 0.5,
        "jitter_order": torch.rand(n, 4, generator=g, device=g.device).argsort(1),
        "jitter": torch.stack([uniform(1 - b, 1 + b), uniform(1 - c, 1 + c), uniform(1 - s, 1 + s),
                               uniform(-hue, hue)], 1),
    }
    if randaugment:
        params["ra_op"] = torch.randint(len(RA_OPS), (n, RA_NUM_OPS), generator=g, device=g.device)
        params["ra_sign"] = torch.where(torch.rand(n, RA_NUM_OPS, generator=g, device=g.device) < 0.5, -1.0, 1.0)
    return params


def _warp(imgs: torch.Tensor, theta: torch.Tensor, size: int, mode: str, padding: str, box=None):
    grid = F.affine_grid(theta, [imgs.shape[0], imgs.shape[1], size, size], align_corners=False)
    if box is not None:  # sample only inside each crop box, as resizing the cropped image does
        lo, hi = box
        grid = torch.maximum(torch.minimum(grid, hi.view(-1, 1, 1, 2)), lo.view(-1, 1, 1, 2))
    return F.grid_sample(imgs, grid, mode=mode, padding_mode=padding, align_corners=False)


def crop_flip_resize(imgs: torch.Tensor, p: dict, size: int) -> torch.Tensor:
    """Crop each sample's box, flip it if drawn, resize to size x size (bilinear): one warp."""
    height, width = imgs.shape[-2:]
    sx, sy = p["w"] / width, p["h"] / height
    cx = (2 * p["left"] + p["w"]) / width - 1
    cy = (2 * p["top"] + p["h"]) / height - 1
    sx = torch.where(p["flip"], -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, sy, cy], 1)], 1)
    lo = torch.stack([(2 * p["left"] + 1) / width - 1, (2 * p["top"] + 1) / height - 1], 1)
    hi = torch.stack([(2 * (p["left"] + p["w"]) - 1) / width - 1, (2 * (p["top"] + p["h"]) - 1) / height - 1], 1)
    return _warp(imgs, theta.to(imgs), size, "bilinear", "border", box=(lo.to(imgs), hi.to(imgs)))


def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, factor):
    return (factor.view(-1, 1, 1, 1) * x + (1 - factor.view(-1, 1, 1, 1)) * other).clamp(0, 1)


def _adjust_hue(x, shift):
    """RGB -> HSV, rotate hue by shift (in turns), HSV -> RGB, as torchvision's tensor path."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = maxc * (1 - sat), maxc * (1 - sat * f), maxc * (1 - sat * (1 - f))
    # (r, g, b) of the six hue sectors i = 0..5, selected element-wise (a stacked copy of all
    # six sectors cost the GPU loader a quarter of its time)
    def pick(*sector):
        value = sector[5]
        for k in range(5):
            value = torch.where(i == k, sector[k], value)
        return value
    return torch.stack([pick(maxc, q, p, p, t, maxc), pick(t, maxc, maxc, q, p, p), pick(p, p, t, maxc, maxc, q)], 1)


def color_jitter(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Brightness, contrast, saturation, hue, each sample in its own random order."""
    factors = p["jitter"].to(x)
    for step in range(4):
        op = p["jitter_order"][:, step].to(x.device).view(-1, 1, 1, 1)
        mean_gray = _gray(x).mean((2, 3), keepdim=True)
        candidates = (_blend(x, torch.zeros_like(x), factors[:, 0]),
                      _blend(x, mean_gray, factors[:, 1]),
                      _blend(x, _gray(x), factors[:, 2]),
                      _adjust_hue(x, factors[:, 3]))
        x = torch.where(op == 0, candidates[0], torch.where(op == 1, candidates[1],
                        torch.where(op == 2, candidates[2], candidates[3])))
    return x


def _geometric_theta(op, sign, size: int):
    """Output->input affine maps (normalized coords) of RandAugment's geometric ops."""
    n = op.shape[0]
    shear = sign * 0.3 * RA_LEVEL
    shift = sign * int(150 / 331 * size * RA_LEVEL) * 2 / size
    angle = sign * math.radians(30 * RA_LEVEL)
    theta = torch.zeros(n, 2, 3, device=op.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    is_op = lambda name: op == RA_OPS.index(name)
    # shears act about the top-left corner, as in torchvision (center=[0, 0])
    theta[:, 0, 1] = torch.where(is_op("ShearX"), shear, 0.0)
    theta[:, 0, 2] = torch.where(is_op("ShearX"), shear, 0.0) + torch.where(is_op("TranslateX"), -shift, 0.0)
    theta[:, 1, 0] = torch.where(is_op("ShearY"), shear, 0.0)
    theta[:, 1, 2] = torch.where(is_op("ShearY"), shear, 0.0) + torch.where(is_op("TranslateY"), -shift, 0.0)
    rot = is_op("Rotate")
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta[:, 0, 0] = torch.where(rot, cos, theta[:, 0, 0])
    theta[:, 1, 1] = torch.where(rot, cos, theta[:, 1, 1])
    theta[:, 0, 1] = torch.where(rot, -sin, theta[:, 0, 1])
    theta[:, 1, 0] = torch.where(rot, sin, theta[:, 1, 0])
    return theta


def _sharpen_blur(x):
    """torchvision's adjust_sharpness kernel [[1,1,1],[1,5,1],[1,1,1]]/13, borders unchanged."""
    kernel = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(x.shape[1], 1, 3, 3)
    blurred = F.conv2d(x, kernel, groups=x.shape[1])
    return F.pad(blurred, (1, 1, 1, 1)) + x * F.pad(torch.zeros_like(blurred[:1, :1]), (1, 1, 1, 1), value=1)


def _equalize(x):
    """Per image and channel histogram equalization on 8-bit levels (torchvision's algorithm)."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    last = 255 - (hist > 0).flip(1).float().argmax(1, keepdim=True)
    step = torch.floor((hist.sum(1, keepdim=True) - hist.gather(1, last)) / 255)
    lut = torch.floor((hist.cumsum(1) + torch.floor(step / 2)) / step.clamp_min(1))
    lut = F.pad(lut, (1, 0))[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, levels), levels.float()) / 255
    return out.view(n, c, h, w)


def rand_augment(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Two RandAugment ops per sample, each drawn from the 14 of torchvision's op space."""
    size = x.shape[-1]
    magnitude = RA_LEVEL * 0.9
    for k in range(RA_NUM_OPS):
        op = p["ra_op"][:, k].to(x.device)
        sign = p["ra_sign"][:, k].to(x)
        theta = _geometric_theta(op, sign, size).to(x)
        x = _warp(x, theta, size, "nearest", "zeros")
        factor = 1 + sign * magnitude
        levels = torch.floor(x * 255.999)
        lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        results = {
            "Brightness": _blend(x, torch.zeros_like(x), factor),
            "Color": _blend(x, _gray(x), factor),
            "Contrast": _blend(x, _gray(x).mean((2, 3), keepdim=True), factor),
            "Sharpness": _blend(x, _sharpen_blur(x), factor),
            "Posterize": torch.floor(levels / 2) * 2 / 255,  # 7 bits at magnitude 9
            "Solarize": torch.where(x >= (255 - 8.5 * 9) / 255, 1 - x, x),
            "AutoContrast": torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), x),
            "Equalize": _equalize(x),
        }
        for name, result in results.items():
            x = torch.where((op == RA_OPS.index(name)).view(-1, 1, 1, 1), result, x)
    return x


def apply(imgs_uint8: torch.Tensor, p: dict, size: int) -> torch.Tensor:
    """Augment a uint8 batch [N, 3, H, W] with per-sample params; float [N, 3, size, size] in [0, 1]."""
    x = crop_flip_resize(imgs_uint8.float() / 255, p, size)
    x = color_jitter(x, p)
    if "ra_op" in p:
        x = rand_augment(x, p)
    return x
