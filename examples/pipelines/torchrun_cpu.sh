#!/usr/bin/env bash
# Two processes, each protecting a disjoint share of the shards (gloo on CPU; with GPUs each rank
# takes cuda:LOCAL_RANK and nccl). Rank 0 merges summary.json; .done/*.json say which rank wrote what.
. "$(dirname "$0")/_common.sh"
demo_shards "$WORK/shards"
"$REPO/.venv/bin/torchrun" --standalone --nproc-per-node=2 -m cgan_cli protect \
  "$WORK/shards/photos-{000000..000002}.tar" --out "$WORK/protected" -w "$WEIGHTS" --device cpu --workers 1
cat "$WORK/protected/.done/"*.json
"$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s['world_size'], s['shards'], s['counts'])" "$WORK/protected/summary.json"
