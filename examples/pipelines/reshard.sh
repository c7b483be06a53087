#!/usr/bin/env bash
# Protect and re-shard in one pass: at most 2 samples per output shard, ShardWriter-style names.
. "$(dirname "$0")/_common.sh"
demo_shards "$WORK/shards"
"$CGAN" protect "$WORK/shards/photos-{000000..000002}.tar" --out "$WORK/resharded" -w "$WEIGHTS" \
  --shard-size 2 --shard-pattern 'protected-%06d.tar'
for f in "$WORK/resharded"/*.tar; do echo "$f"; tar tf "$f"; done
