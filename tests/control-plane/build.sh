#!/usr/bin/env bash
# Builds the real control plane that every Tidepool test runs against, from the
# Go modules: kube-apiserver, kube-controller-manager, kube-scheduler, kubectl,
# etcd, kwok and helm; and SeaweedFS, the S3 server the results store is
# tested against. Idempotent; everything is cached by version outside the
# checkout, so a second run costs seconds. Prints the bin directory last.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_VERSION=${HELM_VERSION:-v3.21.4}
# SeaweedFS publishes no tagged module versions: this is its commit of 2026-11-09 (4.53).
SEAWEEDFS_VERSION=${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}

CACHE=${TIDEPOOL_CACHE:-$HOME/.cache/tidepool}
BIN="$CACHE/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION-helm-$HELM_VERSION/bin"
export GOTOOLCHAIN=local
export GOMODCACHE="$CACHE/go/mod"
export GOCACHE="$CACHE/go/build"
export GOFLAGS="-mod=mod -buildvcs=false -trimpath"
export CGO_ENABLED=0

log() { printf '[control-plane] %s\n' "$*" >&2; }

have_all() {
  for b in kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm "weed-$SEAWEEDFS_VERSION"; do
    [ -x "$BIN/$b" ] || return 1
  done
}

if have_all; then
  log "cached in $BIN"
  echo "$BIN"
  exit 0
fi
mkdir -p "$BIN"
# Test binaries may call this script at the same time: one builds, the others wait.
exec 9>"$BIN/../.build.lock"
flock 9
if have_all; then
  log "cached in $BIN"
  echo "$BIN"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

build_kubernetes() {
  local names=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
  local missing=0
  for n in "${names[@]}"; do [ -x "$BIN/$n" ] || missing=1; done
  [ "$missing" = 1 ] || return 0
  log "building Kubernetes $K8S_VERSION (this is the slow part on a cold cache)"
  local mod="$work/k8s"
  mkdir -p "$mod"
  # k8s.io/kubernetes points its staging modules at ./staging with replace
  # directives, which only apply inside its own module. Point each one at its
  # published release instead (staging v0.X.Y ships with Kubernetes v1.X.Y).
  local staging="v0${K8S_VERSION#v1}"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  {
    echo "module tidepool.dev/control-plane/k8s"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$mod/go.mod"
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  local minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  local date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done
  (
    cd "$mod"
    go mod tidy -e >/dev/null 2>&1 || true
    for n in "${names[@]}"; do
      log "go build $n"
      go build -tags tools -ldflags "$ldflags" -o "$BIN/$n.tmp" "k8s.io/kubernetes/cmd/$n"
      mv "$BIN/$n.tmp" "$BIN/$n"
    done
  )
}

build_etcd() {
  [ -x "$BIN/etcd" ] && return 0
  log "building etcd $ETCD_VERSION"
  local mod="$work/etcd"
  mkdir -p "$mod"
  cat >"$mod/go.mod" <<GOMOD
module tidepool.dev/control-plane/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (
    cd "$mod"
    go mod tidy -e >/dev/null 2>&1 || true
    go build -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3
    mv "$BIN/etcd.tmp" "$BIN/etcd"
  )
}

build_go_install() {
  local name=$1 pkg=$2 version=$3
  [ -x "$BIN/$name" ] && return 0
  log "building $name $version"
  local flags="-s -w"
  if [ "$name" = helm ]; then
    flags+=" -X helm.sh/helm/v3/internal/version.version=$version"
  fi
  GOBIN="$work/gobin" GOFLAGS="-buildvcs=false -trimpath" go install -ldflags "$flags" "$pkg@$version"
  mv "$work/gobin/$name" "$BIN/$name"
}

build_seaweedfs() {
  local name="weed-$SEAWEEDFS_VERSION"
  [ -x "$BIN/$name" ] && return 0
  log "building SeaweedFS $SEAWEEDFS_VERSION"
  # Its go.mod has replace directives, which `go install pkg@version` refuses:
  # build from a copy of the module, where they apply.
  local dir
  dir=$(go mod download -json "github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
  cp -r "$dir" "$work/seaweedfs"
  chmod -R u+w "$work/seaweedfs"
  (
    cd "$work/seaweedfs"
    go build -ldflags "-s -w" -o "$BIN/$name.tmp" ./weed
    mv "$BIN/$name.tmp" "$BIN/$name"
  )
}

build_etcd
build_seaweedfs
build_go_install kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
build_go_install helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
build_kubernetes

have_all
"$BIN/kube-apiserver" --version >&2
log "ready in $BIN"
echo "$BIN"
