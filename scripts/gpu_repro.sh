#!/usr/bin/env bash
# Reproduce the paper's ALFWorld / WebShop runs (Qwen2.5-1.5B-Instruct) on one GPU node.
# See docs/gpu_reproduction.md. Nothing is downloaded at run time: bring the model and the data.
#
#   scripts/gpu_repro.sh check                 # GPU, model, data, opt-in GPU tests
#   scripts/gpu_repro.sh smoke [overrides...]   # minutes: iteration time + weight-sync time (bench e2e)
#   scripts/gpu_repro.sh alfworld [overrides...]  # full runs, every estimator x seed
#   scripts/gpu_repro.sh webshop  [overrides...]
#
# Environment: MODEL_DIR (default /models/Qwen2.5-1.5B-Instruct), ALFWORLD_DATA (default
# /data/alfworld), WEBSHOP_DATA (default /data/webshop), ESTIMATORS (default
# "proxmo gigpo grpo"), SEEDS (default "0 1 2"), OUT (default runs/gpu-repro).
set -euo pipefail
cd "$(dirname "$0")/.."
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
MODEL_DIR=${MODEL_DIR:-/models/Qwen2.5-1.5B-Instruct}
ALFWORLD_DATA=${ALFWORLD_DATA:-/data/alfworld}
WEBSHOP_DATA=${WEBSHOP_DATA:-/data/webshop}
ESTIMATORS=${ESTIMATORS:-"proxmo gigpo grpo"}
SEEDS=${SEEDS:-"0 1 2"}
OUT=${OUT:-runs/gpu-repro}
PROXMO=.venv/bin/proxmo

die() { echo "gpu_repro: $*" >&2; exit 2; }

need_gpu() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || die "no NVIDIA GPU visible (nvidia-smi -L failed)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

need_model() {
  [ -f "$MODEL_DIR/config.json" ] || die "MODEL_DIR=$MODEL_DIR is not a Hugging Face folder; copy Qwen2.5-1.5B-Instruct there first"
}

need_setup() {
  [ -f .venv/.setup-done ] || bash scripts/setup.sh   # installs the CUDA build of vLLM when a GPU is present
}

run_paper() {  # $1 = alfworld|webshop, rest = overrides
  local env=$1; shift
  local cfg=deploy/configs/paper_${env}_qwen2.5-1.5b.yaml data
  if [ "$env" = alfworld ]; then data=$ALFWORLD_DATA; [ -d "$data/json_2.1.1" ] || die "ALFWORLD_DATA=$data lacks json_2.1.1 (run alfworld-download where GitHub is reachable)"; fi
  if [ "$env" = webshop ]; then data=$WEBSHOP_DATA; [ -d "$data" ] || die "WEBSHOP_DATA=$data not found (your WebShop checkout with its product data)"; fi
  mkdir -p "$OUT"
  local summary="$OUT/${env}_summary.tsv"
  printf 'estimator\tseed\tsuccess_before\tsuccess_after\teval_episodes\n' > "$summary"
  for seed in $SEEDS; do
    for est in $ESTIMATORS; do
      local name="paper-${env}-${est}-s${seed}" log
      log="$OUT/$name.log"
      echo "[gpu_repro] $name -> $log"
      # ray.address= : a local Ray on this node (the config's "auto" joins a running cluster).
      "$PROXMO" train --config "$cfg" run_name="$name" output_dir="$OUT" seed="$seed" learner.seed="$seed" \
        algorithm.estimator="$est" model.path="$MODEL_DIR" env.data_path="$data" ray.address= "$@" 2>&1 | tee "$log"
      sed -n 's/^success_before=\([0-9.]*\) success_after=\([0-9.]*\) eval_episodes=\([0-9]*\).*/\1\t\2\t\3/p' "$log" \
        | sed "s/^/${est}\t${seed}\t/" >> "$summary"
    done
  done
  echo "[gpu_repro] summary ($summary):"; column -t "$summary" || cat "$summary"
}

cmd=${1:-}; shift || true
case "$cmd" in
  check)
    need_gpu; need_model; need_setup
    .venv/bin/python -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'vllm', vllm.__version__)"
    .venv/bin/python -m pytest -q -m gpu tests/gpu
    ;;
  smoke)
    # Iteration time and its breakdown (rollout / advantage / update / weight sync), sync vs async,
    # on generated ALFWorld games (no data needed), 2 groups x 8 episodes, 3 iterations per mode.
    need_gpu; need_model; need_setup
    mkdir -p "$OUT"
    "$PROXMO" bench e2e --config deploy/configs/paper_alfworld_qwen2.5-1.5b.yaml --iterations 3 --eval-episodes 8 \
      --out "$OUT/smoke" --json "$OUT/smoke_e2e.json" model.path="$MODEL_DIR" env.options.source=generated \
      env.data_path= ray.address= learner.groups_per_batch=2 rollout.num_workers=2 rollout.min_workers=1 \
      serving.max_replicas=1 rollout.autoscale=false "$@" | tee "$OUT/smoke_e2e.log"
    # Weight publish cost at 1.5B parameters (bf16): learner -> object store -> replica staging.
    "$PROXMO" bench weights --sizes 1.5e9 --dtype bfloat16 --reps 3 --json "$OUT/smoke_weights.json" | tee "$OUT/smoke_weights.log"
    ;;
  alfworld|webshop)
    need_gpu; need_model; need_setup
    run_paper "$cmd" "$@"
    ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
