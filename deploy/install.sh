#!/usr/bin/env bash
# Install crishim and what it needs on a Debian/Ubuntu host, as root.
#   deploy/install.sh          the server: iproute2 + crishim (pip, editable from this tree,
#                              with the `cluster` extra for port-forward --kubeconfig),
#                              curl + nc for the demo's try-it commands (README), and the
#                              system group `crishim` the helper gives its socket to
#   deploy/install.sh --test   also what the test suite drives: containerd, runc, CNI
#                              plugins, gcc (the pause image), socat, prlimit (util-linux:
#                              a server with a low descriptor limit), iptables (a pod port
#                              whose SYNs are dropped), and the test extras
#   deploy/install.sh --bench  also matplotlib, for the benchmarks' chart (benchmarks/)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(iproute2 ca-certificates curl netcat-openbsd)
extras="cluster"
for arg in "$@"; do
    case "$arg" in
        --test)
            packages+=(containerd runc containernetworking-plugins gcc libc6-dev socat util-linux iptables)
            extras+=",test" ;;
        --bench) extras+=",bench" ;;
        -h|--help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $arg (--test, --bench, --help)" >&2; exit 2 ;;
    esac
done

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install.sh: apt-get install ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

# a distribution's own python3 may be "externally managed" (PEP 668): this host tool goes there anyway
PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore \
    --disable-pip-version-check -e ".[${extras}]"
getent group crishim >/dev/null || groupadd --system crishim
echo "install.sh: crishim $(python3 -c 'import crishim; print(crishim.__version__)') installed ($(command -v crishim))" >&2
