"""`msscale bench-train`: calibration fine-tuning of a real architecture, engine by engine.

For each engine of `bench.engines` (plain DDP, ZeRO-2, ZeRO-3, ZeRO-3 with the optimizer
state offloaded to host memory) the bench starts `bench.procs` processes with torchrun
(gloo on CPUs, NCCL on GPUs), each running the fine-tuning loop's own steps
(msscale.finetune.loop: make_accelerator, build_trainee, training_step) on a random-weight
UNet2DModel of the config's topology, gradient checkpointing on, synthetic images. It
records per rank the peak resident memory (getrusage) and on GPUs the peak GPU memory, and
the seconds per optimizer step after `bench.warmup_steps` untimed steps.

Each configuration runs in its own process group, so one that does not fit cannot take the
bench down. "Did not fit" is measured, never guessed: a rank raised out-of-memory, a rank
was SIGKILLed by the kernel, or the configuration's processes together went over the memory
budget (`bench.mem_budget_gb`; by default the memory available when the configuration
starts, less `bench.mem_reserve_gb`), at which point the bench kills them itself so that a
shared machine's OOM killer never has to choose. Checkpoints and the export are not timed
(msscale finetune does them; docs/design.md §3.7).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from msscale.atomic import atomic_write_text
from msscale.config import Key, load_config, nonempty
from msscale.errors import UserError
from msscale.models.schema import CLASSIFIER

log = logging.getLogger(__name__)

ENGINES = ("ddp", "zero2", "zero3", "zero3_offload")
LABELS = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
          "zero3_offload": "ZeRO-3 + optimizer offload"}
RLIMIT_ENV = "MSSCALE_BENCH_RLIMIT_DATA"
GB = 1024**3
MIN_BUDGET_GB = 1.0  # below this (from what is available) a configuration is not started

BENCH_TRAIN_SCHEMA = {
    "seed": Key(int, 0, min=0),
    "out": Key(str, "runs/bench-train", check=nonempty,
               help="scratch: random UNet, synthetic shards, runs"),
    "arch": Key(str, help="the architecture's name in the table"),
    "unet": Key(dict, help="diffusers UNet2DModel config (random weights)"),
    "scheduler": Key(dict, {"num_train_timesteps": 1000}, help="DDPMScheduler arguments"),
    "classifier": CLASSIFIER,
    "calibration": {
        "sigmas": Key(list, [0.25, 0.5, 1.0], item_type=float),
        "draws": Key(int, 2, min=1, help="M: noise draws per image"),
    },
    "deepspeed": {
        "zero2": Key(str, "configs/deepspeed/zero2.json"),
        "zero3": Key(str, "configs/deepspeed/zero3.json"),
        "zero3_offload": Key(str, "configs/deepspeed/zero3_offload.json"),
    },
    "bench": {
        "engines": Key(list, list(ENGINES), item_type=str,
                       check=lambda path, v: _check_engines(path, v)),
        "procs": Key(int, None, nullable=True, min=1,
                     help="processes per configuration; null: the GPUs, or 2 on CPUs"),
        "per_device_batch": Key(int, 1, min=1, help="images per process per micro-batch"),
        "grad_accum": Key(int, 1, min=1),
        "warmup_steps": Key(int, 1, min=0, help="optimizer steps before the timed ones"),
        "steps": Key(int, 1, min=1, help="timed optimizer steps"),
        "gradient_checkpointing": Key(bool, True),
        "mixed_precision": Key(str, "auto", choices=("auto", "no", "bf16")),
        "mem_budget_gb": Key(float, None, nullable=True, min=0.1,
                             help="host memory all ranks may use; null: available - reserve"),
        "mem_reserve_gb": Key(float, 2.0, min=0.0),
        "timeout_min": Key(float, 60.0, min=0.1, help="per configuration"),
    },
}


def _check_engines(path: str, engines: list) -> None:
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise UserError(f"config key {path}: expected some of {list(ENGINES)}, got {engines}")


def load_bench_train_config(path, overrides=()) -> dict:
    return load_config(path, list(overrides), BENCH_TRAIN_SCHEMA)


# ----------------------------------------------------------------------------------------
# The parent: assets, one torchrun per configuration, the table
# ----------------------------------------------------------------------------------------


def run_bench_train(cfg: dict) -> dict:
    """Every engine of the config, one after another; the figures as a dict (see --json)."""
    out = Path(cfg["out"])
    cuda = torch.cuda.is_available()
    procs = cfg["bench"]["procs"] or (torch.cuda.device_count() if cuda else 2)
    denoiser, shards = prepare_assets(cfg, out)
    bench, runs = cfg["bench"], []
    for engine in bench["engines"]:
        runs.append(run_configuration(cfg, engine, procs, denoiser, shards, out / engine))
        atomic_write_text(out / "runs.json", json.dumps(runs, indent=1) + "\n")  # kept as it goes
    return {
        "arch": cfg["arch"], "device": "cuda" if cuda else "cpu", "procs": procs,
        "per_device_batch": bench["per_device_batch"], "draws": cfg["calibration"]["draws"],
        "grad_accum": bench["grad_accum"], "warmup_steps": bench["warmup_steps"],
        "steps": bench["steps"], "gradient_checkpointing": bench["gradient_checkpointing"],
        "cpus": os.cpu_count(), "torch": torch.__version__, "runs": runs,
    }


def prepare_assets(cfg: dict, out: Path) -> tuple[Path, Path]:
    """A random-weight denoiser of cfg's topology and a few synthetic images as shards.

    Both are reused by later runs when the topology (or image size) is unchanged.
    """
    from diffusers import DDPMScheduler, UNet2DModel

    from msscale.data.shards import make_shards
    from msscale.models.loading import save_denoiser

    denoiser = out / "denoiser"
    config_file = denoiser / "config.json"
    wanted = json.loads(json.dumps(cfg["unet"]))
    if config_file.is_file():
        saved = json.loads(config_file.read_text())
        if any(saved.get(k) != v for k, v in wanted.items()):
            shutil.rmtree(denoiser)
    if not config_file.is_file():
        log.info("writing a random-weight UNet2DModel to %s", denoiser)
        with torch.random.fork_rng():
            torch.manual_seed(cfg["seed"])
            try:
                unet = UNet2DModel(**cfg["unet"])
            except (TypeError, ValueError) as err:
                raise UserError(f"config key unet: not a UNet2DModel config: {err}") from None
        save_denoiser(unet, DDPMScheduler(**cfg["scheduler"]), denoiser)
        del unet
    size = int(cfg["unet"]["sample_size"])
    shards = out / f"shards-{size}"
    if not (shards / "dataset.json").is_file():
        folder = out / f"images-{size}"
        generator = torch.Generator().manual_seed(cfg["seed"])
        for index in range(8):
            path = folder / str(index % 2) / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
            from PIL import Image

            Image.fromarray(pixels.numpy()).save(path)
        make_shards(folder, shards, image_size=None, shard_size=8)
    return denoiser, shards / "dataset.json"


def finetune_config(cfg: dict, engine: str, procs: int, denoiser: Path, shards: Path,
                    run_dir: Path) -> dict:
    """The msscale finetune config one configuration runs (the loop's own schema)."""
    bench = cfg["bench"]
    return {
        "seed": cfg["seed"],
        "out": str(run_dir),
        "denoiser": {"path": str(denoiser)},
        "classifier": cfg["classifier"],
        "data": {"train_shards": str(shards), "val_shards": None,
                 "image_size": int(cfg["unet"]["sample_size"]), "num_workers": 0,
                 "shuffle_buffer": 8, "epoch_length": 1000, "random_crop": False,
                 "flip": False},
        "calibration": {"sigmas": cfg["calibration"]["sigmas"],
                        "draws": cfg["calibration"]["draws"]},
        "train": {"max_steps": bench["warmup_steps"] + bench["steps"],
                  "checkpoint_every": 10**9, "resume": False,
                  "batch_size": bench["per_device_batch"] * bench["grad_accum"] * procs,
                  "grad_accum": bench["grad_accum"],
                  "gradient_checkpointing": bench["gradient_checkpointing"],
                  "mixed_precision": bench["mixed_precision"], "warmup_steps": 0},
        "deepspeed": {"config": None if engine == "ddp" else
                      str(Path(cfg["deepspeed"][engine]).resolve())},
    }


def mem_available_gb() -> float:
    """MemAvailable from /proc/meminfo (what the kernel can give without swapping)."""
    import psutil

    return psutil.virtual_memory().available / GB


def run_configuration(cfg: dict, engine: str, procs: int, denoiser: Path, shards: Path,
                      run_dir: Path) -> dict:
    """One engine in its own torchrun, watched for memory and time; its figures."""
    import yaml

    bench = cfg["bench"]
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    ft = finetune_config(cfg, engine, procs, denoiser, shards, run_dir)
    (run_dir / "finetune.yaml").write_text(yaml.safe_dump(ft))
    (run_dir / "bench.json").write_text(json.dumps({"warmup_steps": bench["warmup_steps"]}))
    available = mem_available_gb()
    budget = bench["mem_budget_gb"] or available - bench["mem_reserve_gb"]
    cuda = torch.cuda.is_available()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", RLIMIT_ENV: str(int(budget * GB)),
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]),
                                                      os.environ.get("PYTHONPATH")) if p)}
    if not cuda:
        env["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // procs, 1))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(_free_port()), "-m", "msscale.bench.train", str(run_dir)]
    log.info("%s %s, %d process(es): memory available %.1f GB, budget %.1f GB",
             cfg["arch"], LABELS[engine], procs, available, budget)
    entry = {"arch": cfg["arch"], "engine": engine, "label": LABELS[engine],
             "zero_stage": _zero_stage(ft), "offload": engine == "zero3_offload",
             "procs": procs, "mem_available_gb": round(available, 2),
             "mem_budget_gb": round(budget, 2)}
    if bench["mem_budget_gb"] is None and budget < MIN_BUDGET_GB:
        log.warning("%s %s not run: %.1f GB available", cfg["arch"], LABELS[engine], available)
        return {**entry, **summarize([], None, {"killed": None, "peak_per_process_gb": []},
                                     "", ft, procs),
                "reason": f"not run: only {available:.1f} GB of memory available",
                "load_average": [os.getloadavg()[0]] * 2, "wall_seconds": 0.0}
    load_before = os.getloadavg()[0]  # a shared machine's other work slows the steps down
    started = time.monotonic()
    with (run_dir / "torchrun.log").open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        watch = watch_memory(proc, budget, bench["timeout_min"] * 60)
    ranks = [json.loads(p.read_text()) for p in sorted(run_dir.glob("rank*.json"))]
    if watch["killed"]:
        log.info("killed while the ranks were at: %s", sorted({r.get("phase") for r in ranks}))
    tail = (run_dir / "torchrun.log").read_text(errors="replace")[-3000:]
    entry.update(wall_seconds=round(time.monotonic() - started, 1),
                 peak_rss_gb_total_watched=round(watch["peak_total_gb"], 2),
                 load_average=[round(load_before, 2), round(os.getloadavg()[0], 2)])
    entry.update(summarize(ranks, proc.returncode, watch, tail, ft, procs))
    log.info("%s %s: %s", cfg["arch"], LABELS[engine], format_row(entry))
    return entry


def _zero_stage(ft: dict) -> int:
    if ft["deepspeed"]["config"] is None:
        return 0
    return json.loads(Path(ft["deepspeed"]["config"]).read_text())["zero_optimization"]["stage"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def watch_memory(proc: subprocess.Popen, budget_gb: float, timeout_s: float,
                 floor_gb: float = 0.5) -> dict:
    """Poll the resident memory of `proc`'s process tree until it ends; kill the whole group
    when it goes over `budget_gb`, when the machine has less than `floor_gb` left (others'
    memory grew meanwhile), or when it runs past `timeout_s`. Returns what happened."""
    import psutil

    root = psutil.Process(proc.pid)
    peak_total, peaks, killed, members = 0.0, {}, None, {}
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        total = 0.0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for member in tree:
            members.setdefault(member.pid, member)
            try:
                rss = member.memory_info().rss / GB
            except psutil.Error:
                continue
            total += rss
            peaks[member.pid] = max(peaks.get(member.pid, 0.0), rss)
        peak_total = max(peak_total, total)
        left = psutil.virtual_memory().available / GB
        if total > budget_gb:
            killed = f"went over the memory budget of {budget_gb:.1f} GB ({total:.1f} GB)"
        elif left < floor_gb:
            killed = (f"went over the memory the machine had left: {left:.1f} GB available "
                      f"at {total:.1f} GB (other processes grew)")
        elif time.monotonic() > deadline:
            killed = f"timed out after {timeout_s / 60:.0f} min"
        if killed:
            _kill(members.values())
            proc.wait()
            break
        time.sleep(0.1)
    # torchrun starts each rank in a session of its own: they are killed one by one, and the
    # next configuration's budget is read only once every rank is gone.
    _, alive = psutil.wait_procs(list(members.values()), timeout=60)
    _kill(alive)
    psutil.wait_procs(alive, timeout=60)
    return {"peak_total_gb": peak_total, "killed": killed,
            "peak_per_process_gb": sorted(peaks.values(), reverse=True)}


def _kill(processes) -> None:
    import psutil

    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass


def summarize(ranks: list[dict], returncode: int, watch: dict, tail: str, ft: dict,
              procs: int) -> dict:
    """fits / did not fit / error, and the figures, from the ranks' reports and the watch."""
    ooms = [r["oom"] for r in ranks if r.get("oom")]
    # A rank's own peak (getrusage); the watch's per-process peak covers a rank killed
    # between two reports (the largest process is a rank, not torchrun).
    peaks = [r["peak_rss_gb"] for r in ranks] + watch["peak_per_process_gb"][:1]
    peak_rss = max(peaks, default=None)
    setup = [r["setup_rss_gb"] for r in ranks if "setup_rss_gb" in r]
    gpu = [r["gpu_peak_gb"] for r in ranks if r.get("gpu_peak_gb") is not None]
    entry = {"peak_rss_gb_per_rank": None if peak_rss is None else round(peak_rss, 2),
             "setup_rss_gb_per_rank": round(max(setup), 2) if setup else None,
             "peak_gpu_gb_per_rank": round(max(gpu), 2) if gpu else None,
             "parameters": next((r["parameters"] for r in ranks if "parameters" in r), None),
             "reached": sorted({r.get("phase", "start") for r in ranks}),
             # steps a stopped configuration did finish (rank 0's seconds each)
             "finished_step_seconds": [round(t, 1) for t in
                                       (ranks[0].get("step_seconds", []) if ranks else [])],
             "step_seconds": None, "images_per_s": None, "images_per_s_per_device": None,
             "fits": None, "reason": None}
    if watch["killed"] and watch["killed"].startswith("went over"):  # the budget or the machine
        entry.update(fits=False, reason=watch["killed"])
    elif ooms:
        entry.update(fits=False, reason=f"out of memory: {ooms[0]}")
    elif "exitcode  : -9" in tail and not watch["killed"]:
        entry.update(fits=False, reason="a rank was SIGKILLed (the kernel's OOM killer?)")
    elif watch["killed"]:
        entry.update(reason=watch["killed"])
    elif returncode != 0 or len(ranks) != procs or not all(r["done"] for r in ranks):
        entry.update(reason=f"failed (exit {returncode}): " + tail.strip()[-600:])
    else:
        seconds = statistics.median(ranks[0]["timed"])
        images = ft["train"]["batch_size"]
        entry.update(fits=True, step_seconds=round(seconds, 2),
                     first_step_seconds=round(ranks[0]["step_seconds"][0], 2),
                     images_per_step=images,
                     images_per_s=round(images / seconds, 4),
                     images_per_s_per_device=round(images / seconds / procs, 4),
                     local_parameters=ranks[0].get("local_elements"))
    return entry


def format_row(entry: dict) -> str:
    if entry["fits"]:
        gpu = (f", peak GPU {entry['peak_gpu_gb_per_rank']:.2f} GB/rank"
               if entry["peak_gpu_gb_per_rank"] is not None else "")
        return (f"fits: peak RSS {entry['peak_rss_gb_per_rank']:.2f} GB/rank{gpu}, "
                f"{entry['step_seconds']:.1f} s/step, {entry['images_per_s']:.3g} images/s "
                f"({entry['images_per_s_per_device']:.3g} per device)")
    verdict = "did not fit" if entry["fits"] is False else "error"
    setup = entry["setup_rss_gb_per_rank"]
    held = f"; {setup:.2f} GB/rank after set-up" if setup is not None else ""
    return f"{verdict}: {entry['reason']} (ranks at {', '.join(entry['reached'])}{held})"


def format_report(result: dict) -> str:
    """The table `msscale bench-train` prints."""
    lines = [
        f"{result['arch']}: {result['procs']} process(es) on {result['device']}, "
        f"{result['per_device_batch']} image(s) x {result['draws']} draws per device, "
        f"grad_accum {result['grad_accum']}, gradient checkpointing "
        f"{'on' if result['gradient_checkpointing'] else 'off'}; "
        f"{result['warmup_steps']} untimed + {result['steps']} timed step(s); "
        f"{result['cpus']} CPUs",
        "",
        "| engine | parameters | RSS/rank after set-up (GB) | peak RSS/rank (GB) | "
        "peak GPU/rank (GB) | s/step | images/s (total) | images/s/device | fits | "
        "memory available / budget (GB) | load average |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        params = f"{run['parameters'] / 1e6:.1f}M" if run["parameters"] else "-"
        fits = {True: "yes", False: "no", None: "error"}[run["fits"]]
        if run["fits"] is not True:
            fits += f" ({run['reason'][:120]}; ranks at {', '.join(run['reached'])})"
        lines.append(
            f"| {run['label']} | {params} | {_num(run['setup_rss_gb_per_rank'])} | "
            f"{_num(run['peak_rss_gb_per_rank'])} | "
            f"{_num(run['peak_gpu_gb_per_rank'])} | {_num(run['step_seconds'], 1)} | "
            f"{_num(run['images_per_s'], 4)} | {_num(run['images_per_s_per_device'], 4)} | "
            f"{fits} | {run['mem_available_gb']:.1f} / {run['mem_budget_gb']:.1f} | "
            f"{run['load_average'][0]:.1f}-{run['load_average'][1]:.1f} |")
    return "\n".join(lines) + "\n"


def _num(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


# ----------------------------------------------------------------------------------------
# A rank (under torchrun): the loop's own steps, timed, and what this rank used
# ----------------------------------------------------------------------------------------


def worker(run_dir: Path) -> int:
    """Run warm-up and timed steps of the fine-tuning loop, reporting into rank<r>.json as it
    goes (a rank killed for memory leaves how far it got and what it held by then)."""
    limit = int(os.environ.get(RLIMIT_ENV, "0"))
    if limit:  # a backstop under the parent's watch: allocations past it fail, no OOM killer
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    try:  # should the kernel run out of memory all the same, it takes a rank, not a neighbour
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        logging.getLogger("msscale").setLevel(logging.WARNING)
    report = Report(run_dir / f"rank{rank}.json", rank=rank, oom=None, done=False)
    try:
        _steps(run_dir, report)
        code = 0
    except (torch.OutOfMemoryError, MemoryError) as err:
        code = report.update(oom=_first_line(err)) or 3
    except RuntimeError as err:
        if not _is_oom(err):
            raise
        code = report.update(oom=_first_line(err)) or 3
    if code:
        sys.stderr.flush()
        os._exit(code)  # the other ranks wait in a collective: torchrun stops them
    return code


class Report(dict):
    """A rank's figures, rewritten to its file (atomically) at each update."""

    def __init__(self, path: Path, **values):
        super().__init__(values)
        self.path = path
        self.update()

    def update(self, **values) -> None:
        super().update(values)
        self["rss_gb"] = _rss_gb()
        self["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self))
        os.replace(tmp, self.path)


def _rss_gb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / GB


def _steps(run_dir: Path, report: Report) -> None:
    from msscale.data.stream import TrainStream
    from msscale.finetune.accelerator import make_accelerator
    from msscale.finetune.checkpoints import TrainerState
    from msscale.finetune.evaluate import TrainingWindow
    from msscale.finetune.loop import build_trainee, training_step
    from msscale.finetune.schema import load_finetune_config, per_device_batch
    from msscale.finetune.zero3 import partition_summary, partitioned_parameters

    cfg = load_finetune_config(run_dir / "finetune.yaml")
    warmup = json.loads((run_dir / "bench.json").read_text())["warmup_steps"]
    accelerator = make_accelerator(cfg)
    world = accelerator.num_processes
    run = build_trainee(cfg, accelerator)
    module = accelerator.unwrap_model(run.unet)
    if partitioned_parameters(module):
        share = partition_summary(module)
        report.update(parameters=share["parameters"], local_elements=share["local_elements"])
    else:
        report.update(parameters=sum(p.numel() for p in module.parameters()))
    # Weights, optimizer state, EMA, buffers: what the rank holds before the first step.
    report.update(phase="set up", setup_rss_gb=_rss_gb())
    stream = TrainStream(cfg, per_device_batch(cfg, world), accelerator.process_index, world)
    window = TrainingWindow(len(run.scales.sigmas), accelerator.device)
    state, times = TrainerState(), []
    cuda = accelerator.device.type == "cuda"
    while state.step < cfg["train"]["max_steps"]:
        report.update(phase=f"step {state.step + 1}")
        accelerator.wait_for_everyone()
        started = time.perf_counter()
        applied, _ = training_step(accelerator, run, stream, window, state, cfg)
        if cuda:
            torch.cuda.synchronize()
        accelerator.wait_for_everyone()
        times.append(time.perf_counter() - started)
        if not applied:
            raise RuntimeError("bench-train: a step had a non-finite loss")
        log.info("step %d: %.2f s", state.step, times[-1])
        report.update(step_seconds=times)
    report.update(phase="done", done=True, timed=times[warmup:],
                  gpu_peak_gb=torch.cuda.max_memory_allocated() / GB if cuda else None)


def _is_oom(err: BaseException) -> bool:
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text \
        or "cannot allocate memory" in text


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:300]


def main(argv: list[str] | None = None) -> int:
    """Entry point of a rank: `python -m msscale.bench.train RUN_DIR` (under torchrun)."""
    from msscale.logs import setup_logging

    setup_logging()
    args = sys.argv[1:] if argv is None else argv
    return worker(Path(args[0]))


if __name__ == "__main__":
    raise SystemExit(main())
