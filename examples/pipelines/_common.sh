# Shared by the example pipelines: where cgan is, which weights to use, and a few demo shards.
# Source it (`. "$(dirname "$0")/_common.sh"`); every script then works from a scratch folder $WORK.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CGAN="${CGAN:-$REPO/.venv/bin/cgan}"
PYTHON="${PYTHON:-$REPO/.venv/bin/python}"
WEIGHTS="${WEIGHTS:-$REPO/weights/cgan-rgb-default.safetensors}"
WORK="${WORK:-$(mktemp -d -t cgan-pipelines.XXXXXX)}"
if [ ! -f "$WEIGHTS" ]; then
  echo "no generator weights at $WEIGHTS: set WEIGHTS=path/to/generator.safetensors (see 'cgan train')" >&2
  exit 2
fi

# demo_shards DIR: three WebDataset shards from examples/photos, each sample = image + cls + json.
demo_shards() {
  local dir="$1" stage i=0 shard key photo
  stage="$(mktemp -d)"
  mkdir -p "$dir" "$stage"/{0,1,2}
  for photo in "$REPO"/examples/photos/*.{jpg,png,webp}; do
    shard=$((i % 3)) key="$(printf 'sample%04d' "$i")"
    cp "$photo" "$stage/$shard/$key.${photo##*.}"
    echo "$((i % 2))" > "$stage/$shard/$key.cls"
    printf '{"source": "%s"}\n' "$(basename "$photo")" > "$stage/$shard/$key.json"
    i=$((i + 1))
  done
  for shard in 0 1 2; do  # sorted names keep a sample's members together, as webdataset requires
    (cd "$stage/$shard" && tar --sort=name -cf "$dir/$(printf 'photos-%06d.tar' "$shard")" -- *)
  done
  rm -rf "$stage"
}
echo "working in $WORK" >&2
