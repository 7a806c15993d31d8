"""What a pretrained MAE is worth (--eval, and each --compare cell): held-out masked loss and
PSNR, a linear probe and kNN on frozen encoder features, and a short fine-tuning (MAE's protocols,
shortened); reconstructions for the grids."""
from __future__ import annotations

import copy
import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import nvfp4

from workbench import cli
from workbench.data import Split, dataset_stats, load_images, plain_images, seed_for
from workbench.errors import UsageError
from workbench.files import check_writable, find_checkpoint, load_model_state, strict_json
from workbench.schedule import warmup_cosine


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def reconstruct(model, imgs, noise, precision: nvfp4.Precision, dataset: str):
    """(loss, originals, visible-only, reconstruction with visible patches pasted in, mask),
    de-normalized with `dataset`'s statistics."""
    with precision.autocast():
        loss, pred, mask = model(imgs, noise)
    pred, target = pred.float(), model.patchify(imgs)
    if model.cfg.norm_pix_loss:  # back to pixels with each patch's own statistics, as MAE's visualization
        pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
    m = mask.unsqueeze(-1)
    mean, std = (torch.tensor(s, device=imgs.device).view(1, 3, 1, 1) for s in dataset_stats(dataset))
    show = lambda patches: (model.unpatchify(patches.contiguous()) * std + mean).clamp(0, 1)
    return loss.item(), show(target), show(target * (1 - m)), show(pred * m + target * (1 - m)), mask


@torch.no_grad()
def heldout_metrics(model, images, precision: nvfp4.Precision, dataset: str, seed: int, limit=10_000, batch=256):
    """Masked-patch MSE (normalized space) and PSNR of masked pixels in [0, 1], fixed masks."""
    device, cfg = next(model.parameters()).device, model.cfg
    g = torch.Generator().manual_seed(seed_for(seed, 7))
    loss_sum, sq_err, pixels, n = 0.0, 0.0, 0.0, min(limit, len(images))
    for start in range(0, n, batch):
        imgs = plain_images(images[start:min(start + batch, n)], dataset, cfg.img_size).to(device)
        noise = torch.rand(len(imgs), cfg.num_patches, generator=g).to(device)
        loss, originals, _, recon, mask = reconstruct(model, imgs, noise, precision, dataset)
        pixel_mask = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, cfg.patch_size ** 2 * 3).contiguous())
        sq_err += ((recon - originals).square() * pixel_mask).sum().item()
        pixels += pixel_mask.sum().item()
        loss_sum += loss * len(imgs)
    return {"heldout_loss": loss_sum / n, "psnr_masked": psnr(sq_err / max(pixels, 1))}


def psnr(mse: float, peak: float = 1.0) -> float:
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def extract_features(model, images, precision: nvfp4.Precision, dataset: str, batch=512):
    device = next(model.parameters()).device
    feats = []
    for start in range(0, len(images), batch):
        with precision.autocast():
            x = plain_images(images[start:start + batch], dataset, model.cfg.img_size).to(device)
            feats.append(model.features(x).float())
    return torch.cat(feats)


def fit(parameters, loss_of, epoch_batches, epochs: int, lr: float, weight_decay: float, warmup_epochs: float):
    """The one loop that fits a head (the linear probe's; fine-tuning's, with the encoder): AdamW
    with MAE's schedule set every step (workbench.schedule); epoch_batches() gives an epoch's
    batches of sample indices, loss_of(indices) their loss."""
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        batches = epoch_batches()
        for i, idx in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr * warmup_cosine(epoch + i / len(batches), warmup_epochs, epochs)
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def linear_probe(train_x, train_y, test_x, test_y, epochs=50, seed=0):
    """MAE's protocol on frozen features: BatchNorm without affine, then a linear head (AdamW with
    cosine decay here instead of LARS, no warm-up)."""
    torch.manual_seed(seed)
    classes = int(max(train_y.max(), test_y.max())) + 1
    head = nn.Sequential(nn.BatchNorm1d(train_x.shape[1], affine=False), nn.Linear(train_x.shape[1], classes))
    head = head.to(train_x.device)
    fit(head.parameters(), lambda idx: F.cross_entropy(head(train_x[idx]), train_y[idx]),
        lambda: torch.randperm(len(train_x), device=train_x.device).split(256), epochs, lr=1e-2, weight_decay=0.0,
        warmup_epochs=0)
    head.eval()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def knn_accuracy(train_x, train_y, test_x, test_y, k=20, temperature=0.07):
    """Weighted kNN on cosine similarity (exp(sim / T) votes, as DINO)."""
    train_x, test_x = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for chunk, labels in zip(test_x.split(1024), test_y.split(1024)):
        sim, idx = (chunk @ train_x.t()).topk(min(k, len(train_x)), dim=1)
        votes = torch.zeros(len(chunk), classes, device=chunk.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == labels).sum().item()
    return correct / len(test_x)


def evaluate(model, precision: nvfp4.Precision, config, train: Split, heldout: Split,
             finetune: Optional["Finetune"] = None, done: Optional[dict] = None, finished=None) -> dict:
    """Held-out loss and PSNR; with labels, linear-probe and kNN accuracy on encoder features,
    and with `finetune` (epochs > 0) the fine-tuned top-1. done: the results of parts finished
    before (a stopped sweep's), which are not run again; finished(results) is called after each
    part (a sweep saves them there, and stops there on a signal)."""
    dataset, seed = config.data.dataset, config.run.seed
    results, finished = dict(done or {}), finished or (lambda results: None)
    model.eval()
    if "heldout_loss" not in results:
        results.update(heldout_metrics(model, heldout.images, precision, dataset, seed))
        finished(results)
    if train.labels is not None and heldout.labels is not None and len(train.labels.unique()) > 1:
        if "knn_acc" not in results:
            device = next(model.parameters()).device
            train_x = extract_features(model, train.images, precision, dataset)
            test_x = extract_features(model, heldout.images, precision, dataset)
            train_y, test_y = train.labels.to(device), heldout.labels.to(device)
            results["linear_probe_acc"] = linear_probe(train_x, train_y, test_x, test_y, seed=seed)
            results["knn_acc"] = knn_accuracy(train_x, train_y, test_x, test_y)
            results["chance_acc"] = 1.0 / len(train.labels.unique())
            finished(results)
        if finetune is not None and finetune.epochs > 0 and "finetune_acc" not in results:
            results["finetune_acc"] = finetune_accuracy(model, precision, config, train, heldout, finetune)
            results["finetune"] = f"{finetune.epochs} epochs, {finetune.precision}"
            finished(results)
    else:
        why = ("its images have no labels (a folder needs two or more first-level subfolders)"
               if train.labels is None or heldout.labels is None else "its training images have one class")
        print(f"[eval] {dataset}: {why}, so no linear probe, kNN or fine-tuning; held-out loss and PSNR only")
        results["accuracy_skipped"] = why
    model.train()
    return results


class Finetune(NamedTuple):
    """--finetune-epochs and --finetune-precision (bf16 or pretrain)."""
    epochs: int
    precision: str

    @classmethod
    def of(cls, command) -> "Finetune":
        return cls(command.finetune_epochs, command.finetune_precision)


@torch.compiler.set_stance("force_eager")
def finetune_accuracy(model, precision: nvfp4.Precision, config, train: Split, heldout: Split,
                      finetune: Finetune, blr=5e-4) -> float:
    """MAE's fine-tuning evaluation, short (facebookresearch/mae main_finetune.py without mixup,
    cutmix, layer decay or drop path): a copy of the encoder and a linear head on its cls feature
    trained end to end on the labelled training split (AdamW, lr blr x batch / 256, weight decay
    0.05, one warm-up epoch then cosine, random flips); in the AMP dtype with the linear layers
    unquantized (bf16) or in the pretraining precision (pretrain). Returns held-out top-1."""
    device, cfg, dataset = next(model.parameters()).device, model.cfg, config.data.dataset
    net = copy.deepcopy(model).train()
    if finetune.precision == "bf16":
        precision = precision.unquantize(net)
    classes = int(max(train.labels.max(), heldout.labels.max())) + 1
    head = nn.Linear(cfg.embed_dim, classes, device=device)
    nn.init.trunc_normal_(head.weight, std=2e-5)  # as MAE's head
    nn.init.zeros_(head.bias)
    batch = min(config.optim.batch_size, len(train.images))
    steps_per_epoch = len(train.images) // batch  # whole batches: the quantized GEMMs' shape rules hold
    g = torch.Generator().manual_seed(seed_for(config.run.seed, 11))

    def loss_of(idx):
        x = plain_images(train.images[idx], dataset, cfg.img_size)
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x).to(device)
        with precision.autocast():
            return F.cross_entropy(head(net.features(x)).float(), train.labels[idx].to(device))
    fit([*net.parameters(), *head.parameters()], loss_of,
        lambda: torch.randperm(len(train.images), generator=g)[:steps_per_epoch * batch].split(batch),
        finetune.epochs, lr=blr * batch / 256, weight_decay=0.05, warmup_epochs=1)
    net.eval()
    features = extract_features(net, heldout.images, precision, dataset, batch)  # batches as in training
    with torch.no_grad(), precision.autocast():
        predicted = torch.cat([head(chunk).argmax(1) for chunk in features.split(batch)])
    return (predicted.cpu() == heldout.labels).sum().item() / len(heldout.images)


def evaluate_checkpoint(path: str, given, explicit, finetune: Finetune, build_model, load_checkpoint) -> dict:
    """--eval CKPT: rebuild the checkpoint's model (the script's build_model(config, device, batch)
    and load_checkpoint(path) -> (checkpoint, Config)), evaluate it, write eval_<ckpt>.json beside it."""
    path = find_checkpoint(path, "--eval")
    ckpt, saved = load_checkpoint(path)
    config, _ = cli.resume_config(saved, given, explicit)  # this device; e.g. another --data-root
    device = torch.device(config.run.device)
    out = path.with_name(f"eval_{path.stem}.json")
    check_writable(out.parent)  # before the evaluation, not after it
    bad = [k for k, v in ckpt["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UsageError(f"checkpoint {path} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): "
                         f"its features would be NaN; evaluate an earlier checkpoint")
    model, precision = build_model(config, device, config.optim.batch_size)
    load_model_state(model, ckpt["model"], str(path))
    if ckpt.get("unquantized"):  # trained to the end in high precision (--high-precision-from)
        precision = precision.unquantize(model)
    results = evaluate(model, precision, config, load_images(config, train=True), load_images(config, train=False),
                       finetune)
    results["checkpoint"], results["step"] = str(path), ckpt["progress"]["step"]
    try:
        out.write_text(strict_json(results, indent=2))
    except OSError as error:
        raise UsageError(f"cannot write {out} ({error.strerror})") from None
    print(strict_json(results, indent=2))
    print(f"[eval] written to {out}")
    return results
