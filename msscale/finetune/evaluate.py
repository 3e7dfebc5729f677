"""Figures of the fine-tuning run: evaluation on held-out images, and what TensorBoard shows."""

from __future__ import annotations

import logging
import math
import time

import torch

from msscale.data.stream import seed_for
from msscale.finetune.objective import Scales

log = logging.getLogger(__name__)

GRID_IMAGES = 8
SHARE_BINS = [i / 20 for i in range(21)]  # pA histograms: bins 0.05 wide over [0, 1]



@torch.no_grad()
def evaluate(accelerator, denoiser, classifier, cfg: dict, scales: Scales, batch_size: int):
    """Per scale over the validation images (each read once, in order, split over ranks),
    from `calibration.eval_draws` draws per image: denoise-and-classify accuracy of single
    draws, smoothed (majority vote) accuracy, the fraction the cascade would defer (top class
    share below p0), the fraction confidently wrong (a wrong top class holding >= p0: what
    the cascade can neither defer nor get right), and the top class's share (pA) of the
    images whose top class is right and of those whose top class is wrong.

    Returns ({tag: value}, {sigma: grid tensor}, {tag: shares}) on every rank; the grid is
    rank 0's, shares are numpy arrays of pA over all ranks' images.
    Every rank runs the same number of denoiser calls: under ZeRO-3 each call gathers the
    UNet's partitions from every rank, so a rank with fewer images runs a blank batch that
    is not counted rather than leaving the others waiting.
    """
    from msscale.data.dataset import open_dataset

    cal, device = cfg["calibration"], accelerator.device
    dataset = open_dataset(cfg["data"]["val_shards"])
    count = min(dataset.count, cfg["data"]["val_images"])
    indices = range(accelerator.process_index, count, accelerator.num_processes)
    # Fixed noise, so evaluations at different steps compare like with like.
    generator = torch.Generator(device).manual_seed(
        seed_for(cfg["seed"], accelerator.process_index, 7))
    # base, smoothed, defer, images, confidently wrong
    tally = torch.zeros(len(scales.sigmas), 5, device=device)
    grids, batch, draws = {}, [], cal["eval_draws"]
    # images by [scale, top class right/wrong, top class votes 0..draws]: pA's distribution
    by_share = torch.zeros(len(scales.sigmas), 2, draws + 1, device=device)

    size = cfg["data"]["image_size"]
    batches = math.ceil(math.ceil(count / accelerator.num_processes) / batch_size)  # rank 0's

    def run(batch, counted=True):
        images = torch.stack([image for _, image, _ in batch]).to(device)
        labels = torch.tensor([label for _, _, label in batch], device=device)
        if images.shape[-1] != size:
            images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear",
                                                     antialias=True, align_corners=False)
        for k, sigma in enumerate(scales.sigmas.tolist()):
            clean = images.repeat(draws, 1, 1, 1)
            noisy = clean + sigma * torch.randn(clean.shape, generator=generator, device=device)
            timesteps = scales.timesteps[k].repeat(len(clean))
            denoised = denoiser(noisy, timesteps)
            preds = classifier(denoised).argmax(-1).view(draws, -1)
            if not counted:
                continue
            votes = torch.nn.functional.one_hot(preds, cfg["classifier"]["num_classes"]).sum(0)
            top_count, top = votes.max(-1)  # ties: lowest class index
            tally[k, 0] += (preds == labels).float().mean(0).sum()
            tally[k, 1] += (top == labels).float().sum()
            defer = top_count < cal["p0"] * draws
            tally[k, 2] += defer.float().sum()
            tally[k, 3] += len(labels)
            tally[k, 4] += ((top != labels) & ~defer).float().sum()
            by_share[k, 0] += torch.bincount(top_count[top == labels], minlength=draws + 1)
            by_share[k, 1] += torch.bincount(top_count[top != labels], minlength=draws + 1)
            if sigma not in grids and accelerator.is_main_process:
                n = min(GRID_IMAGES, len(labels))
                grids[sigma] = torch.cat([noisy[:n].clamp(0, 1), denoised[:n], images[:n]]).float()

    done = 0
    for item in dataset.iter_images(indices):
        batch.append(item)
        if len(batch) == batch_size:
            run(batch)
            batch, done = [], done + 1
    if batch:
        run(batch)
        done += 1
    for _ in range(batches - done):
        run([(None, torch.zeros(3, size, size), 0)], counted=False)
    tally = accelerator.reduce(tally, reduction="sum")
    by_share = accelerator.reduce(by_share, reduction="sum").long().cpu()
    metrics, shares = {}, {}
    values = torch.arange(draws + 1, dtype=torch.float64) / draws
    for k, sigma in enumerate(scales.sigmas.tolist()):
        n = max(float(tally[k, 3]), 1.0)
        metrics[f"eval/sigma_{sigma:g}/denoise_classify_acc"] = float(tally[k, 0]) / n
        metrics[f"eval/sigma_{sigma:g}/smoothed_acc"] = float(tally[k, 1]) / n
        metrics[f"eval/sigma_{sigma:g}/defer_fraction"] = float(tally[k, 2]) / n
        metrics[f"eval/sigma_{sigma:g}/confidently_wrong"] = float(tally[k, 4]) / n
        for row, name in enumerate(("right", "wrong")):
            shares[f"eval/sigma_{sigma:g}/top_share_{name}"] = (
                values.repeat_interleave(by_share[k, row]).numpy())
    return metrics, grids, shares


class TrainingWindow:
    """Loss terms, recoverable counts per scale and throughput since the last log line.

    Summed on the device and reduced over ranks only when logged, after which the time is
    taken: the steps/s and images/s figures are honest.
    """

    def __init__(self, num_scales: int, device):
        self.num_scales, self.device = num_scales, device
        self.reset()

    def reset(self):
        # total, brier, ac, diffusion, batches, images
        self.sums = torch.zeros(6, device=self.device)
        self.rec = torch.zeros(2, self.num_scales, device=self.device)  # recoverable, images
        self.images, self.steps, self.started = 0, 0, time.perf_counter()

    def add(self, parts, scale, images: int) -> None:
        self.sums += torch.stack([parts.total.detach().float(), parts.brier.detach().float(),
                                  parts.anti_consistency.detach().float(),
                                  parts.diffusion.detach().float(),
                                  torch.ones((), device=self.device),
                                  torch.tensor(float(images), device=self.device)])
        self.rec[0] += torch.bincount(scale, weights=parts.recoverable.float(),
                                      minlength=self.num_scales)
        self.rec[1] += torch.bincount(scale, minlength=self.num_scales).float()
        self.images += images

    def flush(self, accelerator, writer, state, lr, grad_norm, scales, micro_batch) -> None:
        sums = accelerator.reduce(self.sums, reduction="sum")
        rec = accelerator.reduce(self.rec, reduction="sum")
        seconds = time.perf_counter() - self.started  # after the reduce: work is done
        steps = max(self.steps, 1)
        if writer is not None:
            n = max(float(sums[4]), 1.0)
            step = state.step
            for i, name in enumerate(("total", "brier", "anti_consistency", "diffusion")):
                writer.add_scalar(f"loss/{name}", float(sums[i]) / n, step)
            for k, sigma in enumerate(scales.sigmas.tolist()):
                if rec[1, k] > 0:
                    writer.add_scalar(f"recoverable/sigma_{sigma:g}",
                                      float(rec[0, k] / rec[1, k]), step)
            writer.add_scalar("train/lr", lr, step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", float(grad_norm), step)
            writer.add_scalar("train/nan_skipped", state.nan_skipped, step)
            writer.add_scalar("perf/images_per_s_per_device", self.images / seconds, step)
            writer.add_scalar("perf/images_per_s", float(sums[5]) / seconds, step)
            writer.add_scalar("perf/steps_per_s", steps / seconds, step)
            writer.flush()
            log.info("step %d loss %.4f recoverable %s lr %.3g %.2f steps/s %.1f img/s/device "
                     "%.1f img/s in total", step, float(sums[0]) / n,
                     [round(float(rec[0, k] / max(rec[1, k], 1)), 3) for k in range(len(rec[0]))],
                     lr, steps / seconds, self.images / seconds, float(sums[5]) / seconds)
        self.reset()


def log_eval(writer, metrics: dict, grids: dict, shares: dict, step: int) -> None:
    if writer is None:
        return
    from torchvision.utils import make_grid

    for tag, value in metrics.items():
        writer.add_scalar(tag, value, step)
    for tag, values in shares.items():
        if len(values):  # an empty histogram is an error in TensorBoard's writer
            writer.add_histogram(tag, values, step, bins=SHARE_BINS)
    for sigma, images in grids.items():
        rows = len(images) // 3
        writer.add_image(f"eval/sigma_{sigma:g}/noisy_denoised_clean",
                         make_grid(images.cpu(), nrow=rows, padding=1), step)
    writer.flush()
    log.info("eval at step %d: %s", step, {k: round(v, 3) for k, v in metrics.items()})
