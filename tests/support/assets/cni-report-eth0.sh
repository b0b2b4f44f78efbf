#!/bin/sh
# CNI plugin for the containerd test harness. It configures nothing: chained after
# `loopback`, it only reports an `eth0` holding 127.0.0.1/8, because containerd 1.6
# refuses a sandbox whose CNI result has no eth0 with an IP. The pod netns keeps
# just `lo`, which is all port-forward needs. Speaks CNI 1.0.0 only.
cat >/dev/null  # the network config; nothing in it matters here
case "$CNI_COMMAND" in
ADD)
    printf '{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"%s"}],' "$CNI_NETNS"
    printf '"ips":[{"address":"127.0.0.1/8","interface":0}]}\n'
    ;;
DEL | CHECK | GC | STATUS)
    ;;
VERSION)
    printf '{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}\n'
    ;;
*)
    printf '{"cniVersion":"1.0.0","code":4,"msg":"unknown CNI_COMMAND %s"}\n' "$CNI_COMMAND"
    exit 1
    ;;
esac
