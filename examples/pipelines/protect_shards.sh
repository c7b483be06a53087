#!/usr/bin/env bash
# Protect a brace pattern of shards into a folder, then rerun: finished shards are skipped.
. "$(dirname "$0")/_common.sh"
demo_shards "$WORK/shards"
"$CGAN" protect "$WORK/shards/photos-{000000..000002}.tar" --out "$WORK/protected" -w "$WEIGHTS"
ls -l "$WORK/protected" "$WORK/protected/.done"
"$CGAN" protect "$WORK/shards/photos-{000000..000002}.tar" --out "$WORK/protected" -w "$WEIGHTS"  # skips all 3
# read them back exactly as a training job would
"$PYTHON" - "$WORK/protected/photos-{000000..000002}.tar" <<'PY'
import sys, webdataset as wds
for s in wds.WebDataset(sys.argv[1], shardshuffle=False):
    print(s["__key__"], sorted(k for k in s if not k.startswith("__")))
PY
