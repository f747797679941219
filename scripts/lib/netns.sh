# shellcheck shell=bash
# Network namespace helpers for wbvmm's network scripts. Source it after common.sh.
#
# Rules these helpers keep (and callers must too): traffic only inside namespaces the
# script creates, 169.254.x.y addresses only, kill only PIDs the script started, delete
# the namespace afterwards.
#
#   wb_netns_tap NS TAP ADDR/PREFIX   create namespace NS (lo up) with tap TAP at ADDR/PREFIX
#   wb_netns_veth NS_A ADDR_A NS_B ADDR_B PREFIX
#                                     create two namespaces joined by a veth pair
#   wb_netns_del NS...                delete namespaces (quietly; missing ones are fine)
#   wb_wait_listen NS PORT [TRIES]    wait (TRIES x 0.1 s, default 50) until a TCP port listens in NS
#   wb_kill_tree PID                  kill PID and its direct children (socat forks one per
#                                     connection), by PID only; reaps PID if it is our child

# wb_check_linklocal ADDR: die unless ADDR is 169.254.x.y.
wb_check_linklocal() {
    case $1 in
        169.254.*) ;;
        *) wb_die "address $1 is not link-local (169.254.x.y); the network scripts use no other" ;;
    esac
}

wb_netns_tap() {
    local ns=$1 tap=$2 cidr=$3
    wb_check_linklocal "${cidr%/*}"
    ip netns add "$ns" || wb_die "cannot create network namespace $ns" "run as root; is iproute2 installed?"
    ip netns exec "$ns" ip link set lo up
    ip netns exec "$ns" ip tuntap add "$tap" mode tap || wb_die "cannot create tap $tap in namespace $ns"
    ip netns exec "$ns" ip addr add "$cidr" dev "$tap" || wb_die "cannot set $cidr on $tap"
    ip netns exec "$ns" ip link set "$tap" up || wb_die "cannot bring up $tap"
}

wb_netns_veth() {
    local a=$1 addr_a=$2 b=$3 addr_b=$4 prefix=$5
    wb_check_linklocal "$addr_a"
    wb_check_linklocal "$addr_b"
    ip netns add "$a" || wb_die "cannot create network namespace $a"
    ip netns add "$b" || wb_die "cannot create network namespace $b"
    ip netns exec "$a" ip link set lo up
    ip netns exec "$b" ip link set lo up
    # Created inside namespace A, so no interface ever appears in the caller's namespace.
    ip netns exec "$a" ip link add veth0 type veth peer name veth1 netns "$b" ||
        wb_die "cannot create a veth pair between $a and $b"
    ip netns exec "$a" ip addr add "$addr_a/$prefix" dev veth0
    ip netns exec "$b" ip addr add "$addr_b/$prefix" dev veth1
    ip netns exec "$a" ip link set veth0 up
    ip netns exec "$b" ip link set veth1 up
}

wb_netns_del() {
    local ns
    for ns in "$@"; do
        [ -n "$ns" ] && ip netns del "$ns" 2>/dev/null
    done
    return 0
}

wb_wait_listen() {
    local ns=$1 port=$2 tries=${3:-50} _i
    for _i in $(seq "$tries"); do
        ip netns exec "$ns" ss -ltn 2>/dev/null | grep -q ":$port " && return 0
        sleep 0.1
    done
    return 1
}

wb_kill_tree() {
    local pid=$1 kids
    [ -n "$pid" ] || return 0
    kids=$(ps -o pid= --ppid "$pid" 2>/dev/null)
    kill "$pid" 2>/dev/null
    # shellcheck disable=SC2086
    [ -n "$kids" ] && kill $kids 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}
