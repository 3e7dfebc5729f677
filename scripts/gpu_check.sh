#!/usr/bin/env bash
# GPU check of the two paper pipelines on one GPU (sized for well under 8 minutes on an H100):
#   1. random-weight OpenAI-format checkpoints of ADM-256 and improved-DDPM CIFAR-10
#      (guided_diffusion, from the dev extra), imported with `msscale import-denoiser`;
#   2. `msscale bench` (the reference way vs msscale's full and cascade schedules) with
#      configs/certify_imagenet.yaml (ADM-256 + timm BEiT-L/512, random weights) and
#      configs/certify_cifar10.yaml (iDDPM + a random transformers ViT-B/16 built from a config);
#   3. a few bf16 calibration fine-tuning steps of each (configs/finetune_*.yaml; ImageNet with
#      its DeepSpeed ZeRO-2 JSON) on digit shards resized to the denoiser's size (timing only).
# Nothing is downloaded. Figures are JSON files in OUT (the first argument, else $OUT, else
# runs/gpu_check); status.json has each step's exit code and seconds. A failing step is
# recorded and the script goes on, so one run gives every figure it can.
# MSSCALE_GPU_CHECK_TINY=1: reduced widths, tiny classifiers and draws, on the CPU, fp32
# (tests/test_gpu_check.py runs it so). PYTHON: the interpreter (default .venv/bin/python).
set -uo pipefail
OUTDIR=${1:-${OUT:-runs/gpu_check}}
PY=${PYTHON:-.venv/bin/python}
HELP="$PY scripts/gpu_check_models.py"
mkdir -p "$OUTDIR/models" && : > "$OUTDIR/status.tsv"
export HF_HUB_OFFLINE=1  # nothing from the hub, ever

step() {  # step NAME COMMAND...: run it, record exit code and seconds
  local name=$1 start=$SECONDS; shift
  echo "== $name: $*" >&2
  "$@"; local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$OUTDIR/status.tsv"
}

if [[ ${MSSCALE_GPU_CHECK_TINY:-0} == 1 ]]; then
  DEV=(device=cpu precision=fp32)
  ADM=(--override num_channels=32 --override num_head_channels=32
       --override image_size=64 --override attention_resolutions=8,4,2)
  IDDPM=(--override num_channels=32)
  BEIT=(classifier.name=test_vit classifier.input_size=64)
  VIT=(--image-size 224 --tiny)
  DRAWS=(smoothing.n0=2 smoothing.n=4 smoothing.batch_size=4 smoothing.noise_block=4)
  TRAIN=(train.max_steps=1 train.batch_size=2 calibration.draws=2 'train.mixed_precision="no"'
         train.gradient_checkpointing=false data.num_workers=0 deepspeed.config=null)
  ADM_SIZE=64
else
  DEV=(device=cuda precision=bf16)
  ADM=(); IDDPM=(); BEIT=(); VIT=(--image-size 224)
  DRAWS=()
  TRAIN=(train.max_steps=4 train.mixed_precision=bf16 data.num_workers=2)
  ADM_SIZE=256
fi
M="$OUTDIR/models"
BENCH=(bench.images=1 bench.warmup=1 bench.rounds=2 bench.inputs=random data.shards=none)

# 1. models: random OpenAI-format checkpoints -> import-denoiser; a random ViT directory
step checkpoint_adm $HELP checkpoint --arch adm-imagenet256-uncond --out "$M/adm.pt" "${ADM[@]}"
step import_adm $PY -m msscale import-denoiser "$M/adm.pt" --arch adm-imagenet256-uncond \
  --out "$M/adm_256x256_uncond" "${ADM[@]}"
rm -f "$M/adm.pt"
step checkpoint_iddpm $HELP checkpoint --arch iddpm-cifar10-uncond --out "$M/iddpm.pt" \
  "${IDDPM[@]}"
step import_iddpm $PY -m msscale import-denoiser "$M/iddpm.pt" --arch iddpm-cifar10-uncond \
  --out "$M/iddpm_cifar10_uncond" "${IDDPM[@]}"
step vit $HELP vit --out "$M/vit" "${VIT[@]}"
IMAGENET=(denoiser.path="$M/adm_256x256_uncond" classifier.pretrained=false "${BEIT[@]}")
CIFAR=(denoiser.path="$M/iddpm_cifar10_uncond" classifier.name="$M/vit")

# 2. certification sampling throughput (and FLOPs per sample) of each pipeline
step bench_imagenet bash -c '"$@" > "'"$OUTDIR"'/bench_imagenet.json"' _ \
  $PY -m msscale bench --cfg configs/certify_imagenet.yaml --json "${DEV[@]}" \
  "${IMAGENET[@]}" "${BENCH[@]}" smoothing.n0=16 smoothing.n=128 smoothing.batch_size=32 \
  smoothing.noise_block=64 "${DRAWS[@]}" out="$OUTDIR/unused"
step bench_cifar10 bash -c '"$@" > "'"$OUTDIR"'/bench_cifar10.json"' _ \
  $PY -m msscale bench --cfg configs/certify_cifar10.yaml --json "${DEV[@]}" \
  "${CIFAR[@]}" "${BENCH[@]}" smoothing.n0=100 smoothing.n=1000 smoothing.batch_size=500 \
  "${DRAWS[@]}" out="$OUTDIR/unused"

# 3. calibration fine-tuning steps on digit shards (class labels 0-9 fit both classifiers)
step shards $PY -m msscale make-shards --source digits --split train --image-size 32 \
  --out "$OUTDIR/digits-train"
DATA=(data.train_shards="$OUTDIR/digits-train/dataset.json" data.val_shards=null
      train.log_every=1 train.checkpoint_every=1000)
step finetune_imagenet $PY -m msscale finetune --cfg configs/finetune_imagenet.yaml \
  "${IMAGENET[@]}" "${DATA[@]}" data.image_size=$ADM_SIZE train.batch_size=4 "${TRAIN[@]}" \
  out="$OUTDIR/finetune-imagenet"
step finetune_imagenet_tb bash -c "$HELP tb '$OUTDIR/finetune-imagenet' \
  > '$OUTDIR/finetune_imagenet.json'"
step finetune_cifar10 $PY -m msscale finetune --cfg configs/finetune_cifar10.yaml \
  "${CIFAR[@]}" "${DATA[@]}" data.image_size=32 train.batch_size=32 "${TRAIN[@]}" \
  out="$OUTDIR/finetune-cifar10"
step finetune_cifar10_tb bash -c "$HELP tb '$OUTDIR/finetune-cifar10' \
  > '$OUTDIR/finetune_cifar10.json'"

$PY - "$OUTDIR" <<'EOF'
import json, sys, torch
out = sys.argv[1]
rows = [line.split("\t") for line in open(f"{out}/status.tsv").read().splitlines()]
steps = {name: {"exit_code": int(rc), "seconds": int(s)} for name, rc, s in rows}
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
json.dump({"device": device, "torch": torch.__version__, "steps": steps},
          open(f"{out}/status.json", "w"), indent=2)
print(json.dumps(steps))
sys.exit(any(step["exit_code"] for step in steps.values()))
EOF
