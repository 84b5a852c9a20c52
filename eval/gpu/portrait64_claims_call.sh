# Issue 30, second GPU call (<= 10 min on one H100/H200): the claims study on the 64-px base that the
# first call (eval/gpu/portrait64_first_call.sh) trained and brought back as base64.tgz.* pieces.
# Run from a clean copy of the tree with the pieces in it: mkdir .gpu && git archive HEAD | tar -x -C .gpu;
# cp eval/gpu/portrait64_claims_call.sh <pieces> .gpu/; then `cd .gpu && bash portrait64_claims_call.sh [SEEDS]`
# with .whl and .gpu carried. SEEDS defaults to [0,1,2]. Everything comes back as claims.tgz in $OUT.
set -u
SEEDS=${1:-[0,1,2]}
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/res; mkdir -p $L /tmp/base; T0=$(date +%s)
cat base64.tgz.* | tar xzf - -C /tmp/base || exit 4
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > $L/machine.txt; nproc >> $L/machine.txt
D=/tmp/p64
python3 -m icp.cli shards synth $D/train --identities 1024 --views 8 --resolution 64 --workers 14 --shard-size 64 > $L/data.log 2>&1 &
python3 -m icp.cli shards synth $D/heldout --identities 32 --views 8 --resolution 64 --first-identity 1024 --shard-size 64 --workers 2 >> $L/data.log 2>&1
wait; echo "data_s $(( $(date +%s)-T0 ))" >> $L/times.txt
LEFT=$(( 560 - ($(date +%s)-T0) ))
timeout $LEFT python3 eval/paper_claims.py --config eval/claims/portrait64.yaml "seeds=$SEEDS" data.out=$D \
  fits.pretrain.backbone=/tmp/base/backbone report=$L/claims/portrait64 > $L/claims.log 2>&1
echo "claims_rc $? total_s $(( $(date +%s)-T0 ))" >> $L/times.txt
# The report is rewritten after every job; once more from what finished, in case the time ran out.
timeout 25 python3 eval/paper_claims.py --config eval/claims/portrait64.yaml "seeds=$SEEDS" data.out=$D \
  fits.pretrain.backbone=/tmp/base/backbone report=$L/claims/portrait64 --report-only >> $L/claims.log 2>&1
cp -r runs/portrait64_claims/logs $L/claims_logs 2>/dev/null
tar czf $OUT/claims.tgz -C $OUT res
rm -rf $L
ls -la $OUT
