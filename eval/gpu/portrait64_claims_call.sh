# Issue 30, second GPU call (<= 10 min on one H100/H200): the claims study on the 64-px base that the
# first call (eval/gpu/portrait64_first_call.sh) trained and brought back as base64.tgz.* pieces.
# Run from a clean copy of the tree with the pieces in it: mkdir .gpu && git archive HEAD | tar -x -C .gpu;
# cp eval/gpu/portrait64_claims_call.sh <pieces> .gpu/; then `cd .gpu && bash portrait64_claims_call.sh [SEEDS]`
# (CLAIMS_S=N: the study stops N s after the start instead of 480) with .whl and .gpu carried (and astronaut.png: scikit-image's astronaut, for the real-photo check). SEEDS defaults to [0,1,2]. Everything comes back as claims.tgz in $OUT.
set -u
SEEDS=${1:-[0,1,2]}
. eval/gpu/common.sh
gpu_setup || exit 3
T0=$(date +%s); D=/tmp/p64
# On the machine the base call left warm, its base (already cast to bf16) and shards are still there.
BASE=/tmp/r/base_pretrain/base64/backbone
if [ ! -f $BASE/icp_pretrain.json ]; then
  mkdir -p /tmp/base; BASE=/tmp/base/backbone
  cat base64.tgz.* | tar xzf - -C /tmp/base || exit 4
fi
echo "base $BASE" >> $L/times.txt
if [ -f $D/train/manifest.json ] && [ -f $D/heldout/manifest.json ]; then echo "data cached" >> $L/times.txt
else render_portrait64 $D; fi
STUDY=(python3 eval/paper_claims.py --config eval/claims/portrait64.yaml "seeds=$SEEDS" data.out=$D
       data.identities=${TRAIN_IDS:-1024} device=${DEVICE:-cuda} fits.pretrain.backbone=$BASE report=$L/claims/portrait64)
timeout $(seconds_left ${CLAIMS_S:-480}) "${STUDY[@]}" > $L/claims.log 2>&1
echo "claims_rc $? total_s $(( $(date +%s)-T0 ))" >> $L/times.txt
# The report is rewritten after every job; once more from what finished, in case the time ran out.
timeout 25 "${STUDY[@]}" --report-only >> $L/claims.log 2>&1
for S in runs/portrait64_claims/seed*; do mkdir -p $L/claims_logs; cp -r $S/logs $L/claims_logs/${S##*/} 2>/dev/null; done
# Issue 30's real-photo check: the seed-0 adaptation fit with warping (matching from the base) on
# scikit-image's astronaut (carried as astronaut.png) and a held-out render as the target.
A=$(python3 - <<'PY'
import pathlib, yaml
for c in sorted(pathlib.Path("runs/portrait64_claims").glob("seed0/fits/claims_adaptation/cfg-*/config.yaml")):
    m = yaml.safe_load(c.read_text()); mo = m["model"]
    if mo.get("matching_init") == "base" and mo.get("warp_identity", True) \
            and not mo.get("flow_source") and not mo.get("aux_flow_weight") and (c.parent / "checkpoints/last.ckpt").is_file():
        print(c.parent); break
PY
)
if [ -n "$A" ] && [ -f astronaut.png ]; then
  I=$(printf id%08d ${TRAIN_IDS:-1024}); mkdir -p $L/astronaut; tar xf $D/heldout/shard-000000.tar -C $L/astronaut $I.v03.rgb.png $I.v00.rgb.png
  for V in v00 v03; do
    timeout 30 python3 -m icp.cli generate --profile astronaut.png --target $L/astronaut/$I.$V.rgb.png \
      --checkpoint $A --out $L/astronaut/gen_$V.png >> $L/astronaut/generate.log 2>&1
  done
  echo "$A" >> $L/astronaut/generate.log
fi
tar czf $OUT/claims.tgz -C $OUT res
rm -rf $L
ls -la $OUT
