#!/usr/bin/env bash
# The container's HEALTHCHECK (installed as /usr/local/bin/kythera-healthcheck): GET
# /healthz on the server's first KYTHERA_LISTEN address through bash's /dev/tcp, since
# the slim image has no curl. Exit 0 on "HTTP/1.1 200" (accepting), 1 on anything else:
# 503 while draining, no answer within 2 s, nothing listening.
set -u

addr=${KYTHERA_LISTEN:-0.0.0.0:8080}
addr=${addr%%,*}
host=${addr%:*}
port=${addr##*:}
case $host in
    0.0.0.0 | "") host=127.0.0.1 ;; # every interface: ask over loopback
    "[::]") host=::1 ;;
    "["*"]") # [v6]: bash wants the address bare
        host=${host#[}
        host=${host%]}
        ;;
esac

exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3 || exit 1
IFS= read -r -t 2 status <&3 || exit 1
[[ $status == "HTTP/1.1 200 "* ]] || exit 1
