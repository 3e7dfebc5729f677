"""The demo's own small models, trained from scratch on scikit-learn's digits (no download).

`msscale train-demo-models` reruns this; its output is committed as package data under
msscale/assets/demo/ so the demo starts from the same weights everywhere:
- denoiser/: a diffusers UNet2DModel DDPM (epsilon prediction, linear betas, 1000 steps)
  trained on the digits training split, with its scheduler;
- classifier.safetensors: a small timm classifier trained on the clean training split;
- training.json: the settings and seed below, and the figures the training reached.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from msscale.atomic import atomic_write_text

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parents[1] / "assets" / "demo"
SETTINGS = {
    "seed": 0,
    "image_size": 16,
    "unet_channels": [24, 48],
    "unet_steps": 1200,
    "unet_batch": 32,
    "unet_lr": 2e-3,
    "classifier": "test_resnet",
    "classifier_input_size": 32,
    "classifier_steps": 600,
    "classifier_batch": 64,
    "classifier_lr": 2e-3,
}


def _digits(split: str, workdir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from msscale.data.dataset import open_dataset
    from msscale.data.shards import make_shards

    make_shards("digits", workdir / split, split=split, image_size=SETTINGS["image_size"])
    dataset = open_dataset(workdir / split / "dataset.json")
    items = list(dataset.iter_images(range(dataset.count)))
    return torch.stack([x for _, x, _ in items]), torch.tensor([y for _, _, y in items])


def _augment(images: torch.Tensor) -> torch.Tensor:
    """Random shifts by up to one pixel (digits are not mirror-symmetric: no flips)."""
    padded = F.pad(images, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,))
    return padded[:, :, dy : dy + images.shape[2], dx : dx + images.shape[3]]


def train_unet(images: torch.Tensor):
    """A DDPM (epsilon loss at uniform timesteps) on [-1,1] images."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from msscale.models.tiny import tiny_unet

    unet = tiny_unet(SETTINGS["image_size"], tuple(SETTINGS["unet_channels"]))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    steps = SETTINGS["unet_steps"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=SETTINGS["unet_lr"], weight_decay=0.0)
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, 50, steps)
    abar = scheduler.alphas_cumprod
    losses = []
    for step in tqdm(range(steps), desc="demo UNet", disable=None):
        batch = images[torch.randint(0, len(images), (SETTINGS["unet_batch"],))]
        x0 = _augment(batch) * 2 - 1
        t = torch.randint(0, 1000, (len(x0),))
        noise = torch.randn_like(x0)
        a = abar[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("UNet step %d/%d: loss %.4f", step, steps, loss.item())
    return unet.eval(), scheduler, sum(losses[-200:]) / 200


def train_classifier(images: torch.Tensor, labels: torch.Tensor):
    """The base classifier, trained on clean images only (denoised smoothing's premise)."""
    import timm

    from msscale.smoothing.denoise import Classifier

    model = timm.create_model(SETTINGS["classifier"], pretrained=False, num_classes=10)
    wrapped = Classifier(model, SETTINGS["classifier_input_size"], [0.5] * 3, [0.5] * 3)
    steps = SETTINGS["classifier_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=SETTINGS["classifier_lr"])
    lr_schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, SETTINGS["classifier_lr"], steps)
    for _ in tqdm(range(steps), desc="demo classifier", disable=None):
        pick = torch.randint(0, len(images), (SETTINGS["classifier_batch"],))
        loss = F.cross_entropy(wrapped(_augment(images[pick])), labels[pick])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    return wrapped.eval()


@torch.no_grad()
def _accuracy(classifier, images, labels) -> float:
    return float((classifier(images).argmax(1) == labels).float().mean())


def train_demo_models(out: Path = ASSETS, workdir: Path | None = None) -> dict:
    """Train both models and write them (and training.json) to `out`."""
    import tempfile

    from safetensors.torch import save_file

    from msscale.models.loading import save_denoiser

    torch.manual_seed(SETTINGS["seed"])
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(workdir or tmp)
        train_x, train_y = _digits("train", work)
        test_x, test_y = _digits("test", work)
    unet, scheduler, final_loss = train_unet(train_x)
    classifier = train_classifier(train_x, train_y)
    out.mkdir(parents=True, exist_ok=True)
    save_denoiser(unet, scheduler, out / "denoiser")
    save_file(classifier.model.state_dict(), str(out / "classifier.safetensors"))
    record = {
        "settings": SETTINGS,
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "classifier_parameters": sum(p.numel() for p in classifier.parameters()),
        "unet_final_loss": round(final_loss, 5),
        "classifier_clean_test_accuracy": round(_accuracy(classifier, test_x, test_y), 4),
        "seconds": round(time.time() - started, 1),
        "torch": torch.__version__,
    }
    atomic_write_text(out / "training.json", json.dumps(record, indent=2) + "\n")
    log.info("demo models written to %s: %s", out, record)
    return record
