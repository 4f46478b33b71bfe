#!/usr/bin/env bash
# Builds Helm from its Go module once into the cache (like the Kafka jars) and prints the binary's path.
#
#   tools/helm.sh            build if missing, print the path
#   tools/helm.sh --version  the pinned version
#
# CI starts on a fresh machine, so this cold build counts against its limit: only cmd/helm is built, without
# debug information or file paths (-trimpath -ldflags "-s -w"), under nice so it never starves the suite it
# overlaps (`make test` starts it in the background). Go's module and build caches (1.2 GB) live beside the
# binary only while it is built and are removed afterwards: the 60 MB binary is all that is kept.
set -euo pipefail

HELM_VERSION="${RR_HELM_VERSION:-v3.22.0}"
# The Kubernetes version that Helm release's client-go (v0.37.0) speaks: what `helm template` and `helm lint`
# assume of a cluster. Helm's own release build stamps it; without it they assume Kubernetes 1.20.
KUBE_MAJOR=1
KUBE_MINOR=37
if [[ "${1:-}" == "--version" ]]; then
    echo "$HELM_VERSION"
    exit 0
fi

CACHE="${RR_HELM_CACHE:-${RR_KAFKA_CACHE:-$HOME/.cache/rr-consumer}}"
DEST="$CACHE/helm-$HELM_VERSION"
BIN="$DEST/helm"
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "tools/helm.sh: Go is not installed; Helm $HELM_VERSION is built from its Go module (helm.sh/helm/v3)" >&2
    exit 1
fi

mkdir -p "$DEST"
# One build at a time: the background build of `make test` and a test that needs helm may both get here.
exec 9>"$DEST/.lock"
flock 9
if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi

WORK="$DEST/.build"
export GOFLAGS="-trimpath -buildvcs=false -mod=mod"
export GOMODCACHE="$WORK/mod"
export GOCACHE="$WORK/cache"
export GOPATH="$WORK/path"
export CGO_ENABLED=0
# `go install pkg@version` builds the module exactly as its own go.mod pins it, with no module of ours. The
# versions are stamped as Helm's own release builds do; without them `helm version` says only "v3.22".
echo "tools/helm.sh: building Helm $HELM_VERSION from its Go module into $DEST (once)" >&2
GOBIN="$WORK/bin" nice -n 19 go install \
    -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$KUBE_MAJOR \
        -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$KUBE_MINOR \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=$KUBE_MAJOR \
        -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$KUBE_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
mv "$WORK/bin/helm" "$BIN"
go clean -modcache >/dev/null 2>&1 || true  # the module cache is read-only files: Go removes it itself
rm -rf "$WORK"
echo "$BIN"
