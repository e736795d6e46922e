#!/usr/bin/env bash
# Here, after a device session: what its collect calls brought back goes into the committed ledger.
#   bash reports/h200/merge-back.sh s9 /work/.device/61/bg-g0.tgz /work/.device/61/bg-g1.tgz ...
#   bash reports/h200/merge-back.sh s14 /work/.device/25     # a call that was not detached: its files_at folder
# Each bundle (bg-NAME.tgz, device.sh collect=) is unpacked into .h200/back/SESSION/NAME/ (a later bundle of a
# stream replaces an earlier one: they are cumulative), its ledger merged (a cell measured later wins), its
# outliers put beside the ledger; then the reports are regenerated (NO_REPORT=1: not).
set -euo pipefail
session=$1; shift
LEDGER=${LEDGER:-reports/h200/ledger.sqlite}; MOEQ=${MOEQ:-.venv/serve/bin/moeq}
for bundle in "$@"; do
  if [ -d "$bundle" ]; then  # a call that was not detached: its files_at folder (ledger*.sqlite.gz, device.log)
    dir=.h200/back/$session/call-$(basename "$bundle"); rm -rf "$dir" && mkdir -p "$dir"
    cp "$bundle"/ledger*.sqlite.gz "$bundle"/*.log "$dir"/ 2>/dev/null || true
    ls "$dir"/ledger*.sqlite.gz >/dev/null 2>&1 || { echo "$bundle: no ledger*.sqlite.gz in it" >&2; exit 1; }
  else
    name=$(basename "$bundle" .tgz); dir=.h200/back/$session/${name#bg-}
    rm -rf "$dir" && mkdir -p "$dir" && tar xzf "$bundle" -C "$dir"
  fi
  for gz in "$dir"/ledger*.sqlite.gz; do [ -f "$gz" ] && gunzip -f "$gz"; done
  for db in "$dir"/ledger*.sqlite; do [ -f "$db" ] && $MOEQ ledger merge --ledger "$LEDGER" --from "$db"; done
  for o in "$dir"/outliers-*.json; do [ -f "$o" ] && mkdir -p "$(dirname "$LEDGER")/outliers" && cp "$o" "$(dirname "$LEDGER")/outliers/"; done
  # the fused-MoE benchmark's JSON (device.sh fused), where `moeq report` reads it, one file per session's run
  for f in "$dir"/fused_moe*.json; do  # fused_moe.json, fused_moe-run2.json, ...: fused_moe-s16.json, fused_moe-s16-run2.json
    [ -f "$f" ] || continue; run=$(basename "$f" .json); run=${run#fused_moe}
    mkdir -p "$(dirname "$LEDGER")/benchmarks" && cp "$f" "$(dirname "$LEDGER")/benchmarks/fused_moe-$session$run.json"
  done
  [ -f "$dir/moeq_build.json" ] && echo "$dir/moeq_build.json: a build's record (builds/ beside the ledger takes it by hand)"
  echo "$bundle -> $dir"
done
[ -n "${NO_REPORT:-}" ] || $MOEQ report --ledger "$LEDGER" --name report --out "$(dirname "$LEDGER")"
