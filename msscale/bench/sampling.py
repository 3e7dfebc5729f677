"""`msscale bench`: msscale's certification sampling loop against the reference way.

The reference way is how the public implementations sample (Cohen et al.'s core.py,
Carlini et al.'s denoised smoothing): one image at a time, the image repeated into a batch,
noise drawn per batch with torch.randn_like from the global generator, one scale after
another, selection then estimation, fp32 under torch.no_grad, votes counted in a Python
loop over the predictions. msscale's way is `VoteSampler.votes`, the very code `msscale
certify` runs: counter-based noise, batches filled across images, scales and streams,
votes counted on the device, inference_mode, and the config's precision, channels_last
and compile settings.

Both run on the same weights, the same images and the same draws per image (K (n0 + n)),
in one process with the same threads. Warm-up images come first and are not timed. The
timed images are then run `bench.rounds` times, alternating which way goes first; each
figure is the median over rounds. The `cascade` schedule is timed beside `full`, so its
model evaluations per image and time per image can be compared.

FLOPs per sample are counted with torch.utils.flop_counter on one model pass. The peak
they are compared with is the machine's own, measured here: a large matmul in the precision
each way computes in (fp32 for the reference; the config's precision, bf16 on a GPU, for
msscale).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from msscale.bench.schedules import compare_schedules, format_schedules
from msscale.errors import UserError

log = logging.getLogger(__name__)

WAYS = ("reference", "msscale", "cascade")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
LABELS = {
    "reference": "reference (one image, one scale at a time)",
    "msscale": "msscale, full schedule",
    "cascade": "msscale, cascade schedule",
}


# ----------------------------------------------------------------------------------------
# The reference way
# ----------------------------------------------------------------------------------------


def reference_counts(model, image, sigma, timestep, num, batch_size, num_classes) -> np.ndarray:
    """Cohen et al.'s `_sample_noise`: votes of `num` draws for one image at one scale."""
    counts = np.zeros(num_classes, dtype=np.int64)
    with torch.no_grad():
        remaining = num
        while remaining > 0:
            this_batch = min(batch_size, remaining)
            remaining -= this_batch
            batch = image.repeat((this_batch, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            timesteps = torch.full((this_batch,), timestep, device=image.device)
            predictions = model(batch + noise, timesteps).argmax(1)
            for idx in predictions.cpu().numpy():
                counts[idx] += 1
    return counts


def reference_votes(model, images, sigmas, timesteps, n0, n, batch_size, num_classes):
    """Votes [I, K, 2, C]: each image, each scale, selection (n0) then estimation (n)."""
    votes = np.zeros((len(images), len(sigmas), 2, num_classes), dtype=np.int64)
    for row, image in enumerate(images):
        for k, (sigma, timestep) in enumerate(zip(sigmas, timesteps, strict=True)):
            for stream, num in enumerate((n0, n)):
                votes[row, k, stream] = reference_counts(
                    model, image, sigma, timestep, num, batch_size, num_classes
                )
    return votes


# ----------------------------------------------------------------------------------------
# Models and inputs
# ----------------------------------------------------------------------------------------


def write_random_denoiser(unet_config: dict, path: str | Path) -> None:
    """A denoiser directory with a random-weight UNet2DModel of `unet_config` (for timing).

    An existing directory is reused when its UNet config agrees with `unet_config`.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from msscale.models.loading import save_denoiser

    path = Path(path)
    config_file = path / "config.json"
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        wanted = json.loads(json.dumps(unet_config))  # tuples -> lists, as saved
        differs = [k for k, v in wanted.items() if saved.get(k) != v]
        if differs:
            raise UserError(
                f"{path} holds a UNet whose {differs[0]} differs from bench.random_denoiser; "
                "remove the directory or point denoiser.path elsewhere"
            )
        return
    log.info("writing a random-weight UNet2DModel to %s", path)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = UNet2DModel(**unet_config)
    learned = unet.config.out_channels == 2 * unet.config.in_channels
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, variance_type="learned_range" if learned else "fixed_small"
    )
    save_denoiser(unet, scheduler, path)


def bench_inputs(cfg: dict, count: int, model) -> tuple[list[int], torch.Tensor, float | None]:
    """(global indices, images [count, 3, H, W], seconds spent reading one image or None)."""
    from msscale.smoothing.schedules import fit_to_denoiser

    image_size = model.denoiser.unet.config.sample_size
    if cfg["bench"]["inputs"] == "random":
        if image_size is None:
            raise UserError("bench.inputs=random needs a UNet with a sample_size")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        generator = torch.Generator().manual_seed(cfg["seed"])
        return list(range(count)), torch.rand((count, 3, *size), generator=generator), None
    from msscale.data.dataset import open_dataset, select_indices

    dataset = open_dataset(cfg["data"]["shards"])
    indices = select_indices(dataset.count, cfg["data"]["skip"], cfg["data"]["max_images"])
    if len(indices) < count:
        raise UserError(
            f"bench needs {count} images (bench.warmup + bench.images) "
            f"but {cfg['data']['shards']} gives {len(indices)}"
        )
    started = time.perf_counter()
    items = list(dataset.iter_images(indices[:count]))
    load_seconds = (time.perf_counter() - started) / count
    images = fit_to_denoiser(torch.stack([image for _, image, _ in items]), model)
    return [index for index, _, _ in items], images, load_seconds


# ----------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_memory(device: torch.device) -> int | None:
    """Bytes: CUDA's peak allocation, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def timed(fn, device: torch.device) -> tuple[float, int | None, object]:
    """(seconds, peak memory bytes, result) of fn(), synchronised on a GPU."""
    _sync(device)
    _reset_peak_memory(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, _peak_memory(device), result


def flops_per_sample(model, image: torch.Tensor, timestep: int) -> int:
    """FLOPs of one model pass (denoiser + classifier) on one noisy image."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    timesteps = torch.full((1,), timestep, device=image.device)
    # the counter has no formula for the CPU flash-attention kernel; the math backend's
    # matmuls it counts, on every device
    with FlopCounterMode(display=False) as counter, torch.inference_mode(), \
            sdpa_kernel(SDPBackend.MATH):
        model(image[None], timesteps)
    return int(counter.get_total_flops())


def matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 10
) -> dict:
    """The best FLOP/s of a square `dtype` matmul on `device` (the machine's own peak)."""
    size = size or (8192 if device.type == "cuda" else 2048)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        seconds, _, _ = timed(lambda: torch.mm(a, b), device)
        best = min(best, seconds)
    return {
        "flops_per_s": 2 * size**3 / best,
        "dtype": str(dtype).removeprefix("torch."),
        "size": size,
    }


# ----------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------


def _sampler(cfg: dict, model, device: torch.device, schedule: str, num_images: int):
    from msscale.certify.plan import plan_shard
    from msscale.smoothing.schedules import VoteSampler

    cfg = {**cfg, "smoothing": {**cfg["smoothing"], "schedule": schedule}}
    streams = plan_shard(cfg, num_images, 0, 1, 1)[1]
    return VoteSampler(cfg, model, streams, device)


class Setup:
    """The models and images of one benchmark, and how each way draws their votes."""

    def __init__(self, cfg: dict, device: torch.device):
        from msscale.models.loading import build_smoothed_model, prepare_for_inference

        bench, smoothing = cfg["bench"], cfg["smoothing"]
        if bench["random_denoiser"] is not None:
            write_random_denoiser(bench["random_denoiser"], cfg["denoiser"]["path"])
        self.plain = build_smoothed_model(cfg, device)  # the reference's: fp32, NCHW, eager
        fast = prepare_for_inference(copy.deepcopy(self.plain), cfg)
        self.fast = fast
        count = bench["warmup"] + bench["images"]
        self.index, images, self.load_seconds = bench_inputs(cfg, count, self.plain)
        self.images = images.to(device)
        self.smoothing, self.num_classes = smoothing, cfg["classifier"]["num_classes"]
        self.timesteps = [self.plain.denoiser.timestep(s) for s in smoothing["sigmas"]]
        self.samplers = {
            "msscale": _sampler(cfg, fast, device, "full", count),
            "cascade": _sampler(cfg, fast, device, "cascade", count),
        }

    def votes(self, way: str, rows: slice) -> np.ndarray:
        """Votes [I, K, 2, C] of the images in `rows`, drawn `way`."""
        if way == "reference":
            smoothing = self.smoothing
            return reference_votes(
                self.plain,
                self.images[rows],
                smoothing["sigmas"],
                self.timesteps,
                smoothing["n0"],
                smoothing["n"],
                smoothing["batch_size"],
                self.num_classes,
            )
        select, estimate = self.samplers[way].votes(self.index[rows], self.images[rows])
        return np.stack([select, estimate], axis=2)


def time_ways(setup: Setup, warmup: int, images: int, rounds: int, device) -> dict:
    """{way: [{seconds, peak_memory, votes} per round]}; warm-up images first, untimed."""
    if warmup:
        log.info("warm-up on %d image(s) (not timed)", warmup)
        for way in WAYS:
            setup.votes(way, slice(0, warmup))
    timed_rows = slice(warmup, warmup + images)
    results = {way: [] for way in WAYS}
    for round_no in range(rounds):
        for way in WAYS if round_no % 2 == 0 else WAYS[::-1]:
            seconds, peak, votes = timed(lambda way=way: setup.votes(way, timed_rows), device)
            results[way].append({"seconds": seconds, "peak_memory": peak, "votes": votes})
            log.info("round %d, %s: %.2f s", round_no + 1, way, seconds)
    return results


def run_bench(cfg: dict, device: torch.device) -> dict:
    """Time the reference way and msscale's full and cascade schedules, then (with
    bench.schedule_images) certify under each schedule side by side; return the figures."""
    bench, smoothing = cfg["bench"], cfg["smoothing"]
    setup = Setup(cfg, device)
    precisions = {"reference": "fp32", "msscale": cfg["precision"], "cascade": cfg["precision"]}
    dtypes = sorted(set(precisions.values()))
    peaks_before = [matmul_peak(device, DTYPES[p]) for p in dtypes]
    load_before = _load_average()
    rounds = time_ways(setup, bench["warmup"], bench["images"], bench["rounds"], device)
    flops = flops_per_sample(setup.plain, setup.images[-1], setup.timesteps[0])
    peaks = {  # the better of before and after: other work on the machine only lowers it
        p: max(before, matmul_peak(device, DTYPES[p]), key=lambda m: m["flops_per_s"])
        for p, before in zip(dtypes, peaks_before, strict=True)
    }
    result = {
        "device": _device_name(device),
        "threads": torch.get_num_threads(),
        "load_average": [load_before, _load_average()],  # other work on the machine
        "torch": torch.__version__,
        "images": bench["images"],
        "warmup_images": bench["warmup"],
        "rounds": bench["rounds"],
        **{key: smoothing[key] for key in ("sigmas", "n0", "n", "batch_size", "noise_block")},
        **{key: cfg[key] for key in ("precision", "channels_last", "compile")},
        "flops_per_sample": flops,
        "matmul_peak": peaks,
        "load_seconds_per_image": setup.load_seconds,
        "peak_memory_is": (
            "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
        ),
    }
    for way in WAYS:
        peak = peaks[precisions[way]]["flops_per_s"]
        figures = _summarise(rounds[way], bench["images"], flops, peak)
        result[way] = {"precision": precisions[way], **figures}
    result["speedup"] = _median_ratio(rounds["reference"], rounds["msscale"])
    result["cascade_speedup_per_image"] = _median_ratio(rounds["reference"], rounds["cascade"])
    result["top_class_agreement"] = _agreement(
        rounds["reference"][0]["votes"], rounds["msscale"][0]["votes"]
    )
    if bench["schedule_images"]:
        result["schedules"] = compare_schedules(cfg, setup.fast, device, timed)
    return result


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS does not tell)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _median_ratio(slow: list[dict], fast: list[dict]) -> float:
    """Median over rounds of slow's time / fast's time (the same round: the same conditions)."""
    return statistics.median(a["seconds"] / b["seconds"] for a, b in zip(slow, fast, strict=True))


def _summarise(rounds: list[dict], images: int, flops: int, peak_flops: float) -> dict:
    """Median figures of one way over its rounds."""
    evaluations = int(rounds[0]["votes"].sum())
    seconds = statistics.median(r["seconds"] for r in rounds)
    peaks = [r["peak_memory"] for r in rounds if r["peak_memory"] is not None]
    samples_per_s = evaluations / seconds
    return {
        "samples_per_s": samples_per_s,
        "seconds_per_image": seconds / images,
        "evaluations_per_image": evaluations / images,
        "flops_per_s": samples_per_s * flops,
        "peak_share": samples_per_s * flops / peak_flops,
        "peak_memory_bytes": max(peaks) if peaks else None,
        "seconds_per_round": [r["seconds"] for r in rounds],
    }


def _agreement(reference: np.ndarray, msscale: np.ndarray) -> float:
    """Share of (image, scale) pairs whose top estimation class is the same both ways."""
    return float((reference[:, :, 1].argmax(-1) == msscale[:, :, 1].argmax(-1)).mean())


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return f"cpu ({platform.processor() or platform.machine()})"


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f} {prefix}{unit}"
    return f"{value:.1f} {unit}"


def _loads(loads: list) -> str:
    return " -> ".join("n/a" if load is None else f"{load:.1f}" for load in loads)


def format_report(result: dict) -> str:
    """The human-readable table of `run_bench`'s figures."""
    peaks = ", ".join(
        f"{name} {_si(peak['flops_per_s'], 'FLOP/s')}"
        for name, peak in result["matmul_peak"].items()
    )
    lines = [
        f"msscale bench on {result['device']}, {result['threads']} threads, "
        f"torch {result['torch']}, load average {_loads(result['load_average'])}",
        f"{result['images']} images (after {result['warmup_images']} warm-up), "
        f"sigmas {result['sigmas']}, n0={result['n0']}, n={result['n']}, "
        f"batch {result['batch_size']}, median of {result['rounds']} rounds",
        f"one sample (denoiser + classifier) = {_si(result['flops_per_sample'], 'FLOP')}; "
        f"measured matmul peak: {peaks}",
        f"msscale settings: precision {result['precision']}, "
        f"channels_last {result['channels_last']}, compile {result['compile']}; "
        f"peak mem is the {result['peak_memory_is']}",
        "",
        f"{'':44}{'samples/s':>10}{'s/image':>9}{'evals/image':>12}"
        f"{'FLOP/s':>14}{'of peak':>14}{'peak mem':>10}",
    ]
    for way in WAYS:
        row = result[way]
        memory = row["peak_memory_bytes"]
        lines.append(
            f"{LABELS[way]:44}{row['samples_per_s']:>10.1f}{row['seconds_per_image']:>9.2f}"
            f"{row['evaluations_per_image']:>12.0f}{_si(row['flops_per_s'], 'FLOP/s'):>14}"
            f"{row['peak_share']:>9.1%} {row['precision']}"
            f"{(f'{memory / 2**20:.0f} MiB' if memory else 'n/a'):>10}"
        )
    full, cascade = result["msscale"], result["cascade"]
    lines += [
        "",
        f"msscale / reference: {result['speedup']:.2f}x samples/s, same draws per image",
        f"cascade: {cascade['evaluations_per_image']:.0f} model evaluations per image vs "
        f"{full['evaluations_per_image']:.0f} for full: "
        f"{result['cascade_speedup_per_image']:.2f}x the reference's images/s",
        f"top estimation class, reference vs msscale: the same for "
        f"{result['top_class_agreement']:.0%} of (image, scale) pairs",
    ]
    load = result["load_seconds_per_image"]
    if load is not None:
        share = load / full["seconds_per_image"]
        lines.append(
            f"reading and decoding an image: {load * 1e3:.2f} ms ({share:.2%} of its sampling)"
        )
    if "schedules" in result:
        lines += ["", *format_schedules(result["schedules"])]
    return "\n".join(lines) + "\n"
