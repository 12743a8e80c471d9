#!/usr/bin/env bash
# Install the offline image data that tools/lite/train_heads.py reads (not needed to *use* lite).
#   Debian: openclipart-png (public domain), tuxpaint-stamps-default (GPL-2+), dataset-fashion-mnist (MIT)
#   npm:    emoji-datasource-google 16.0.0 (images Apache-2.0), unpacked under $ADACLIP_LITE_DATA
# None of these images is committed; only sample_data/ (made by tools/make_sample_data.py) is.
set -euo pipefail
DATA_DIR="${ADACLIP_LITE_DATA:-/tmp/adaclip-lite-data}"
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

missing=""
for pkg in openclipart-png tuxpaint-stamps-default dataset-fashion-mnist; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq $missing
fi

if [ ! -f "$DATA_DIR/emoji/package/emoji.json" ]; then
  mkdir -p "$DATA_DIR/emoji"
  (cd "$DATA_DIR/emoji" && npm pack --silent emoji-datasource-google@16.0.0 >/dev/null \
     && tar xzf emoji-datasource-google-16.0.0.tgz && rm emoji-datasource-google-16.0.0.tgz)
fi
echo "lite training data ready (emoji under $DATA_DIR/emoji/package)"
