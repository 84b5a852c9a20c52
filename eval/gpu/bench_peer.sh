# Issue 29, one GPU call (<= 9 min on one H100, compilation included): icp's training step against
# plain diffusers + torch.compile (the compiled peer, both modes) in the same run, the plan
# "peer_train" of icp/bench/plan.py, judged by experiments/perf/targets.yaml. `bash ... PLAN` runs
# another plan in another call: peer_sample (evaluation sampling against the compiled ControlNet
# loop, both modes), steps (the stitching / adaptation MFU targets).
# Run from the root of a clean copy of the tree with the wheels beside it (the device image lacks
# diffusers, omegaconf, webdataset): mkdir .gpu && git archive HEAD | tar -x -C .gpu; then
# `cd .gpu && bash eval/gpu/bench_peer.sh` with .whl and .gpu carried (or from the tree's root with
# .whl carried). Afterwards, here: copy res/bench_train.{md,json} over eval/results/bench_train.*
# (the file names its machine and the peer rows) and quote the ratios in README.
set -u
PLAN=${1:-peer_train}; shift 2>/dev/null  # further arguments go to the bench (--tiny: the CPU smoke run of every row)
. eval/gpu/common.sh
gpu_setup || exit 3
# The bench starts its clock after its imports (~15 s): rows are started while they fit 460 s by
# their estimates (icp/bench/plan.py ROW_COST_S, compile warm-ups included); a row that did not fit is
# listed as skipped in the report (run it in another call: --only ROWS). The table is rewritten after
# each row, so the timeout below, which keeps the call under 9 minutes, loses at most the last row.
timeout 520 python3 eval/bench_train.py --plan $PLAN --budget 460 --out $L "$@" > $L/bench.log 2>&1
echo "bench_rc $?" >> $L/machine.txt
tail -c 2000 $L/bench.log
ls -la $L
