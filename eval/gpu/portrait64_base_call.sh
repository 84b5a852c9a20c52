# Issue 30, GPU call 2 (<= 10 min on one H100/H200): the 64-px base again, fed from memory.
# Call 1 (portrait64_first_call.sh) trained at 2.96 steps/s (batch 128: ~380 samples/s from 12 loader
# workers, likely loader-bound) and torch.compile hung the time-boxed fit at its end; here the base
# reads icp.data.resident.ResidentImages (every view decoded once, held as uint8) with compile off
# (off in training too since 05946b0: before it, the training override compiled again and the fit hung
# in inductor before its first step), for a wall-time box, then the probe (every block), 256 samples,
# the base back.
#   mkdir .gpu && git archive HEAD | tar -x -C .gpu; cp eval/gpu/portrait64_base_call.sh .gpu/
#   cd .gpu && bash portrait64_base_call.sh        (.whl and .gpu carried)
# Smaller calls: BOX (the fit's wall time), PAIRS (probe, 128), SAMPLES (256), DEADLINE (590 s), NOBASE=1 (results only).
set -u
. eval/gpu/common.sh
gpu_setup || exit 3
T0=$(date +%s); D=/tmp/p64; R=/tmp/r
# DEADLINE (s after this point, default 590): whatever res/ holds then is packed, in case the call is cut.
( sleep $(( ${DEADLINE:-590} - 15 )); tar czf $OUT/results.tgz -C $OUT res ) & WATCH=$!
render_portrait64 $D
BOX=${BOX:-00:00:05:00}
timeout 40 python3 eval/bench_data.py --resident $D/train > $L/served.json 2>$L/served.log  # samples/s served, to the GPU
T1=$(date +%s)
timeout $(( $(echo $BOX | awk -F: '{print $2*3600+$3*60+$4}') + 60 )) python3 -m icp.cli fit experiments/base_pretrain.yaml run.root=$R run.name=base64 \
  data._target_=icp.data.resident.ResidentImages data.shards=$D/train data.val_shards=$D/heldout +data.workers=15 \
  data.resolution=64 data.batch_size=128 model.backbone.width=64 +model.backbone.levels=3 +model.backbone.layers_per_block=2 \
  +model.backbone.codec_factor=2 "+model.perf={compile: none}" trainer.precision=bf16-mixed trainer.max_steps=100000 \
  trainer.val_check_interval=2000 checkpoint.every_n_train_steps=2000 model.ema_decay=0.999 model.optimizer.lr=5.0e-4 \
  callbacks.samples=null logger.wandb=null +trainer.max_time=$BOX > $L/pretrain.log 2>&1
echo "pretrain_rc $? pretrain_s $(( $(date +%s)-T1 ))" >> $L/times.txt
B=$R/base_pretrain/base64
cp $B/fit_metrics.json $B/backbone/icp_pretrain.json $L/ 2>/dev/null; cp $B/logs/csv/version_0/metrics.csv $L/metrics.csv 2>/dev/null
P="--resolution 64 --pairs ${PAIRS:-128} --ensemble 4 --batch-size 32 --first-identity ${TRAIN_IDS:-1024} --identities 32 --views 8"
timeout $(seconds_left ${DEADLINE:-590} 70) python3 -m icp.eval.correspondence --backbone $B/backbone $P --out $L/probe_base > $L/probe.log 2>&1
timeout $(seconds_left ${DEADLINE:-590} 25) python3 -m icp.eval.base_samples sample $B --count ${SAMPLES:-256} --steps 25 --out $L/samples.npz > $L/samples.log 2>&1
echo "total_s $(( $(date +%s)-T0 ))" >> $L/times.txt
kill $WATCH 2>/dev/null
if [ -n "${NOBASE:-}" ]; then tar czf $OUT/results.tgz -C $OUT res; else bring_back $B; fi
