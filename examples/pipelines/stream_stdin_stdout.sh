#!/usr/bin/env bash
# Tar streams in, tar stream out: nothing is written to disk by cgan itself.
. "$(dirname "$0")/_common.sh"
demo_shards "$WORK/shards"
# stdin -> stdout, compressed on the way out
cat "$WORK/shards/photos-000000.tar" | "$CGAN" protect - --shards --out - -w "$WEIGHTS" | gzip > "$WORK/out.tar.gz"
tar tzvf "$WORK/out.tar.gz"
# a pipe: URL (any command that prints a tar), straight into another program
"$CGAN" protect "pipe:cat $WORK/shards/photos-000001.tar" --out - -w "$WEIGHTS" | tar tvf -
