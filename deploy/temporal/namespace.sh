#!/bin/sh
# Create Keel's namespace, wait until it answers, then register Keel's search attributes.
# Exits non-zero (and so stops `docker compose up`) on anything but "already exists".
set -eu
ns="${KEEL_NAMESPACE:-default}"
tries="${KEEL_SETUP_TRIES:-30}"

retry() {  # retry CMD... up to $tries times, 2 s apart
  n=1
  until "$@"; do
    if [ "$n" -ge "$tries" ]; then echo "failed after $tries tries: $*" >&2; exit 1; fi
    n=$((n + 1)); sleep 2
  done
}

retry temporal operator cluster health
if ! temporal operator namespace describe --namespace "$ns" >/dev/null 2>&1; then
  retry temporal operator namespace create --namespace "$ns" --retention 30d
fi
retry temporal operator namespace describe --namespace "$ns"

for sa in $KEEL_SEARCH_ATTRIBUTES; do
  name="${sa%%:*}" type="${sa##*:}"
  if ! out=$(temporal operator search-attribute create --namespace "$ns" --name "$name" --type "$type" 2>&1); then
    case "$out" in
      *"already exists"*|*"AlreadyExists"*) echo "search attribute $name exists" ;;
      *) echo "$out" >&2; exit 1 ;;
    esac
  fi
done
listed=$(temporal operator search-attribute list --namespace "$ns")
for sa in $KEEL_SEARCH_ATTRIBUTES; do
  echo "$listed" | grep -q "${sa%%:*}" || { echo "search attribute ${sa%%:*} missing after setup" >&2; exit 1; }
done
echo "namespace $ns and search attributes ready"
