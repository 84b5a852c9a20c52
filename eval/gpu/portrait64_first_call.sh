# Issue 30, first GPU call (<= 10 min on one H100/H200): 64-px shards, a time-boxed base, the
# correspondence probe on the base and on random weights, 256 base samples, the base back in bf16 pieces.
# Run from a clean copy of the tree with the wheels beside it (the device image lacks diffusers, omegaconf,
# webdataset, facenet-pytorch): mkdir .gpu && git archive HEAD | tar -x -C .gpu; cp eval/gpu/portrait64_first_call.sh .gpu/;
# then `cd .gpu && bash portrait64_first_call.sh` with .whl and .gpu carried. Score the samples here afterwards:
#   python -m icp.eval.base_samples score samples.npz --heldout <held-out shards at 64 px>
set -u
. eval/gpu/common.sh
gpu_setup || exit 3
D=/tmp/p64; R=/tmp/r; T0=$(date +%s)
render_portrait64 $D
T1=$(date +%s)
timeout 230 python3 -m icp.cli fit experiments/base_pretrain.yaml run.root=$R run.name=base64 data.shards=$D/train data.val_shards=$D/heldout data.resolution=64 model.backbone.width=64 +model.backbone.levels=3 +model.backbone.layers_per_block=2 +model.backbone.codec_factor=2 data.batch_size=128 data.num_workers=12 trainer.precision=bf16-mixed trainer.max_steps=10000 trainer.val_check_interval=2500 checkpoint.every_n_train_steps=2500 model.ema_decay=0.999 model.optimizer.lr=5.0e-4 callbacks.samples.every_n_steps=5000 logger.wandb=null +trainer.max_time=00:00:02:40 > $L/pretrain.log 2>&1
echo "pretrain_rc $? pretrain_s $(( $(date +%s)-T1 ))" >> $L/times.txt
B=$R/base_pretrain/base64
cp $B/fit_metrics.json $L/ 2>/dev/null; tail -c 3000 $B/logs/csv/version_0/metrics.csv > $L/metrics_tail.csv 2>/dev/null
# In parallel with the probe and the samples: the claims study's first seed on this base and these
# shards, for whatever time is left (the report is rewritten after every job; a later call redoes it).
LEFT=$(( 545 - ($(date +%s)-T0) ))
timeout $LEFT python3 eval/paper_claims.py --config eval/claims/portrait64.yaml "seeds=[0]" data.out=$D \
  fits.pretrain.backbone=$B/backbone report=$L/claims/portrait64 > $L/claims.log 2>&1 &
CLAIMS=$!
P="--resolution 64 --pairs 128 --ensemble 4 --batch-size 32 --first-identity 1024 --identities 32 --views 8"
python3 -m icp.eval.correspondence --backbone $B/backbone $P --out $L/probe_base > $L/probe.log 2>&1
python3 -m icp.eval.correspondence --backbone tiny --tiny '{"width":64,"levels":3,"layers_per_block":2,"codec_factor":2,"prediction_type":"sample"}' $P --out $L/probe_random >> $L/probe.log 2>&1
python3 -m icp.eval.base_samples sample $B --count 256 --steps 25 --out $L/samples.npz > $L/samples.log 2>&1
wait $CLAIMS; echo "claims_rc $?" >> $L/times.txt
cp -r runs/portrait64_claims/logs $L/claims_logs 2>/dev/null
echo "total_s $(( $(date +%s)-T0 ))" >> $L/times.txt
bring_back $B
