#!/usr/bin/env bash
# Download and unpack PASCAL VOC for sppdet (needs a network; never run by the tests).
#
#   scripts/download_voc.sh DIR [voc2007|voc2012|all]     (default: all)
#
# Fetches the official tars into DIR, checks each one's size and MD5, and unpacks them, giving
#   DIR/VOCdevkit/VOC2007   (trainval 5011 images + test 4952 images)   -> sppdet --data DIR/VOCdevkit/VOC2007
#   DIR/VOCdevkit/VOC2012   (trainval 11540 images)                     -> sppdet --data DIR/VOCdevkit/VOC2012
# Downloads resume (curl -C -) after an interruption: just run the same command again.
# A tar with the right size and checksum is not fetched again; a finished unpack is not repeated.
# Space needed: about 2.9 GB of tars + 3.6 GB unpacked (delete the tars afterwards if you like).
set -euo pipefail

usage() { echo "usage: $0 DIR [voc2007|voc2012|all]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
DIR=$1
WHAT=${2:-all}
case "$WHAT" in voc2007|voc2012|all) ;; *) usage ;; esac

command -v curl >/dev/null || { echo "$0: error: curl is required" >&2; exit 1; }
command -v tar >/dev/null || { echo "$0: error: tar is required" >&2; exit 1; }
if command -v md5sum >/dev/null; then md5_of() { md5sum "$1" | cut -d' ' -f1; }
elif command -v md5 >/dev/null; then md5_of() { md5 -q "$1"; }       # macOS
else echo "$0: error: md5sum (or md5) is required" >&2; exit 1; fi
size_of() { if stat -c %s "$1" >/dev/null 2>&1; then stat -c %s "$1"; else stat -f %z "$1"; fi; }

mkdir -p "$DIR"

# name | bytes | md5 | path (the official host redirects to thor.robots.ox.ac.uk; pjreddie.com mirrors it)
TARS_2007=(
  "VOCtrainval_06-Nov-2007.tar|460032000|c52e279531787c972589f7e41ab4ae64|voc2007"
  "VOCtest_06-Nov-2007.tar|451020800|b6e924de25625d8de591ea690078ad9f|voc2007"
)
TARS_2012=(
  "VOCtrainval_11-May-2012.tar|1999639040|6cd6e144f989b92b3379bac3b3de84fd|voc2012"
)
HOSTS=("http://host.robots.ox.ac.uk/pascal/VOC" "https://pjreddie.com/media/files")
# VOC_MIRROR=URL: use only this mirror (files at URL/<tar name>), e.g. a local copy via file://
if [ -n "${VOC_MIRROR:-}" ]; then HOSTS=("$VOC_MIRROR"); fi

fetch() {  # fetch NAME BYTES MD5 SUBDIR
  local name=$1 bytes=$2 md5=$3 sub=$4 out="$DIR/$1" have
  if [ -f "$out" ]; then
    have=$(size_of "$out")
    if [ "$have" -gt "$bytes" ]; then
      echo "$out: larger than expected ($have > $bytes bytes); downloading again" >&2
      rm -f "$out"
    fi
  fi
  if [ ! -f "$out" ] || [ "$(size_of "$out")" -ne "$bytes" ]; then
    local ok=0 url
    for host in "${HOSTS[@]}"; do
      if [ "$host" = "http://host.robots.ox.ac.uk/pascal/VOC" ]; then url="$host/$sub/$name"; else url="$host/$name"; fi
      echo "downloading $url -> $out (resumes a partial file)"
      if curl -L --fail --retry 5 --retry-delay 5 -C - -o "$out" "$url"; then ok=1; break; fi
      echo "$url failed; trying the next mirror" >&2
    done
    [ $ok -eq 1 ] || { echo "$0: error: could not download $name (rerun to resume)" >&2; exit 1; }
  fi
  have=$(size_of "$out")
  if [ "$have" -ne "$bytes" ]; then
    echo "$0: error: $out has $have bytes, expected $bytes (rerun to resume)" >&2; exit 1
  fi
  echo "checking MD5 of $out"
  have=$(md5_of "$out")
  if [ "$have" != "$md5" ]; then
    echo "$0: error: $out: MD5 $have, expected $md5; deleting it, rerun to download again" >&2
    rm -f "$out"; exit 1
  fi
  local stamp="$DIR/.unpacked-$name"
  if [ -f "$stamp" ]; then
    echo "$name already unpacked"
  else
    echo "unpacking $out into $DIR"
    tar -xf "$out" -C "$DIR"
    touch "$stamp"
  fi
}

if [ "$WHAT" = voc2007 ] || [ "$WHAT" = all ]; then
  for t in "${TARS_2007[@]}"; do IFS='|' read -r n b m s <<<"$t"; fetch "$n" "$b" "$m" "$s"; done
fi
if [ "$WHAT" = voc2012 ] || [ "$WHAT" = all ]; then
  for t in "${TARS_2012[@]}"; do IFS='|' read -r n b m s <<<"$t"; fetch "$n" "$b" "$m" "$s"; done
fi

echo
echo "done. Dataset roots:"
for y in 2007 2012; do
  r="$DIR/VOCdevkit/VOC$y"
  [ -d "$r/ImageSets/Main" ] && echo "  $r   (splits: $(cd "$r/ImageSets/Main" && ls | grep -v _ | sed 's/\.txt$//' | tr '\n' ' '))"
done
echo "use e.g.: sppdet train --config voc07_zf5 --data $DIR/VOCdevkit/VOC2007"
