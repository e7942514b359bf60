#!/usr/bin/env bash
# Makes sure the Fashion-MNIST IDX files are on this machine. They come from
# Debian's package dataset-fashion-mnist; we install it when we may, and
# otherwise say how to point the trainers at a copy.
set -euo pipefail
dir="${1:-/usr/share/datasets/fashion-mnist}"
files=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
       t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)

have_all() {
  for f in "${files[@]}"; do [ -f "$dir/$f" ] || return 1; done
}

if have_all; then
  echo "Fashion-MNIST: found in $dir"
  exit 0
fi
if [ "$dir" = /usr/share/datasets/fashion-mnist ] \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist
  have_all && exit 0
fi
cat >&2 <<MSG
Fashion-MNIST was not found in $dir (looked for ${files[*]}).
Provide it in one of these ways:
  * as root on Debian/Ubuntu: apt-get update && apt-get install dataset-fashion-mnist
  * download the four IDX .gz files and run: make train FASHION_MNIST_DIR=/path/to/them
MSG
exit 1
