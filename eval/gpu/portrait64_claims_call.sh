# Issue 30, second GPU call (<= 10 min on one H100/H200): the claims study on the 64-px base that the
# first call (eval/gpu/portrait64_first_call.sh) trained and brought back as base64.tgz.* pieces.
# Run from a clean copy of the tree with the pieces in it: mkdir .gpu && git archive HEAD | tar -x -C .gpu;
# cp eval/gpu/portrait64_claims_call.sh <pieces> .gpu/; then `cd .gpu && bash portrait64_claims_call.sh [SEEDS]`
# with .whl and .gpu carried. SEEDS defaults to [0,1,2]. Everything comes back as claims.tgz in $OUT.
set -u
SEEDS=${1:-[0,1,2]}
. eval/gpu/common.sh
gpu_setup || exit 3
mkdir -p /tmp/base; T0=$(date +%s)
cat base64.tgz.* | tar xzf - -C /tmp/base || exit 4
D=/tmp/p64
render_portrait64 $D
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
