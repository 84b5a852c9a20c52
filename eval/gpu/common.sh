# Shared by the GPU call scripts of eval/gpu/: source it from the root of the carried copy of the tree
# (`. eval/gpu/common.sh`), where every script runs.

# Wheels the device image lacks into /tmp/site, offline settings, $L = $OUT/res with machine.txt.
gpu_setup() {
  export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
  local W; W=$(ls -d .whl ../.whl 2>/dev/null | head -1)
  [ -n "$W" ] || { echo "no .whl folder here or one level up (carry the wheels)"; return 3; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W/*.whl || return 3
  export PYTHONPATH=/tmp/site:$PWD
  L=${OUT:-/tmp/out}/res; mkdir -p $L
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $L/machine.txt; nproc >> $L/machine.txt
  python3 -c "import torch,diffusers;print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name())" >> $L/machine.txt
  return 0  # a machine without a GPU (bench_peer.sh --tiny) only lacks those lines
}

# Seconds from now until $1 s after $T0, less $2 (default 0), never below 1: a step's time-out
# counted against a call's deadline (`timeout 0` would mean no limit at all).
seconds_left() {
  local v=$(( $1 - ($(date +%s)-T0) - ${2:-0} )); echo $(( v < 1 ? 1 : v ))
}

# Issue 30's shards at $1: training identities 0..1023 and held-out 1024..1055, 8 views, 64 px
# (TRAIN_IDS, RENDER_WORKERS: fewer, for a CPU smoke run; the held-out identities follow the training
# ones, as in the claims study's own shards, so that the study finds them its own).
render_portrait64() {
  local T0; T0=$(date +%s)
  python3 -m icp.cli shards synth $1/train --identities ${TRAIN_IDS:-1024} --views 8 --resolution 64 --workers ${RENDER_WORKERS:-15} --shard-size 64 > $L/data.log 2>&1 & local P=$!
  python3 -m icp.cli shards synth $1/heldout --identities 32 --views 8 --resolution 64 --first-identity ${TRAIN_IDS:-1024} --shard-size 64 --workers 1 >> $L/data.log 2>&1
  # wait for the one renderer, not a bare wait: that also waits for a caller's background watchdog
  wait $P; echo "data_s $(( $(date +%s)-T0 ))" >> $L/times.txt
}

# The results in $L as $OUT/results.tgz, then the base of pretrain run $1 (weights cast to bf16) as
# $OUT/base64.tgz.* pieces of 15 MB (what comes back from the device is at most 16 MB a file).
bring_back() {
  tar czf $OUT/results.tgz -C $OUT res
  python3 - "$1/backbone" <<'PY'
import sys, pathlib, safetensors.torch as st, torch
for f in pathlib.Path(sys.argv[1]).rglob("*.safetensors"):
    sd = st.load_file(str(f)); st.save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in sd.items()}, str(f))
PY
  tar czf - -C $1 backbone fit_metrics.json config.yaml | split -b 15M - $OUT/base64.tgz.
  rm -rf $L
  ls -la $OUT
}
