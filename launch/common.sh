#!/usr/bin/env bash
# Shared by the launchers (sourced, not run): quoting for printed commands, and dry-run-or-run.
# The sourcing script sets `dry` (1: print each command instead of running it).

# Single-quote an argument for printing when the shell would split or expand it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

# Print (dry run) or run one command; printed lines can be pasted into a shell.
run() {
  if [[ ${dry:-0} -eq 1 ]]; then
    printf '+'; for a in "$@"; do printf ' %s' "$(quote "$a")"; done; printf '\n'
  else
    "$@"
  fi
}
