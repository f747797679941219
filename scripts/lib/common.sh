# shellcheck shell=bash
# Shared shell helpers for wbvmm's scripts. Source it; it does not change shell options.
#
#   . "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# Messages go to stderr so that stdout stays usable for data.
wb_log()  { printf '==> %s\n' "$*" >&2; }
wb_note() { printf '    %s\n' "$*" >&2; }
wb_warn() { printf 'warning: %s\n' "$*" >&2; }
# wb_die MESSAGE [HINT]: print what failed and what to do, exit 1.
wb_die() {
    printf 'error: %s\n' "$1" >&2
    if [ $# -gt 1 ] && [ -n "$2" ]; then printf '  what to do: %s\n' "$2" >&2; fi
    exit 1
}

# Run a command as root: directly when we are root, else through sudo.
wb_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        wb_die "need root for: $*" "run this script as root, or install and configure sudo"
    fi
}

# wb_need_cmd CMD PACKAGE: fail clearly when a tool is missing.
wb_need_cmd() {
    command -v "$1" >/dev/null 2>&1 ||
        wb_die "'$1' not found" "install the Debian package '$2' (scripts/setup.sh does it: apt-get install $2)"
}

# Is a Debian package installed? (dpkg-query status "install ok installed")
wb_pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# The file holding the non-free component that wb_enable_nonfree adds.
WB_NONFREE_SOURCES=/etc/apt/sources.list.d/wbvmm-non-free.sources

# wb_nonfree_config: print, on stdout, the deb822 text that adds the 'non-free' component to every
# enabled Debian bookworm source (bookworm, bookworm-updates, bookworm-security) that lacks it,
# reusing each source's URIs and Signed-By. Prints nothing when every such source already has
# non-free. Reads /etc/apt/sources.list, /etc/apt/sources.list.d/*.list (one-line format) and
# /etc/apt/sources.list.d/*.sources (deb822), ignoring our own file.
wb_nonfree_config() {
    local files=() f
    [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && [ "$f" != "$WB_NONFREE_SOURCES" ] && files+=("$f")
    done
    [ ${#files[@]} -gt 0 ] || return 0
    # Emit "URI<TAB>SUITE<TAB>SIGNED-BY<TAB>HAS-NONFREE" for every deb source of a bookworm suite
    # with the main component, from both formats.
    awk '
    function flush(   n, i, u, s, nu, ns, uris, suites) {
        if (stype ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no" && scomp ~ /(^|[ \t])main([ \t]|$)/) {
            nf = (scomp ~ /(^|[ \t])non-free([ \t]|$)/) ? 1 : 0
            nu = split(suris, uris, /[ \t]+/); ns = split(ssuites, suites, /[ \t]+/)
            for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++)
                if (uris[u] != "" && suites[s] ~ /^bookworm(-updates|-security)?$/)
                    print uris[u] "\t" suites[s] "\t" ssigned "\t" nf
        }
        stype = ""; suris = ""; ssuites = ""; scomp = ""; ssigned = ""; enabled = ""
    }
    FNR == 1 { if (deb822) flush(); deb822 = (FILENAME ~ /\.sources$/) }
    deb822 {
        if ($0 ~ /^[ \t]*$/) { flush(); next }
        if ($0 ~ /^[ \t]*#/) next
        key = tolower($1); sub(/:$/, "", key)
        val = $0; sub(/^[^:]*:[ \t]*/, "", val)
        if (key == "types") stype = val
        else if (key == "uris") suris = val
        else if (key == "suites") ssuites = val
        else if (key == "components") scomp = val
        else if (key == "signed-by") ssigned = val
        else if (key == "enabled") enabled = tolower(val)
        next
    }
    /^[ \t]*deb[ \t]/ {
        line = $0; signed = ""
        if (match(line, /\[[^]]*\]/)) {
            opts = substr(line, RSTART + 1, RLENGTH - 2)
            if (match(opts, /signed-by=[^ \t]+/)) signed = substr(opts, RSTART + 10, RLENGTH - 10)
            sub(/\[[^]]*\]/, "", line)
        }
        n = split(line, w, /[ \t]+/)
        # w[1] may be empty when the line starts with blanks
        i = (w[1] == "") ? 2 : 1
        uri = w[i + 1]; suite = w[i + 2]; comps = ""
        for (j = i + 3; j <= n; j++) comps = comps " " w[j]
        if (suite ~ /^bookworm(-updates|-security)?$/ && comps ~ / main( |$)/)
            print uri "\t" suite "\t" signed "\t" ((comps ~ / non-free( |$)/) ? 1 : 0)
    }
    END { if (deb822) flush() }
    ' "${files[@]}" | sort -u | awk -F '\t' '
        { key = $1 "\t" $2; if ($4 == 1) have[key] = 1; else if (!(key in sig)) { sig[key] = $3; order[++n] = key } }
        END {
            first = 1
            for (i = 1; i <= n; i++) {
                key = order[i]
                if (key in have) continue
                split(key, p, "\t")
                if (!first) print ""
                first = 0
                print "Types: deb"
                print "URIs: " p[1]
                print "Suites: " p[2]
                print "Components: non-free"
                if (sig[key] != "") print "Signed-By: " sig[key]
            }
        }'
}

# wb_enable_nonfree: make Debian's non-free component available (netperf lives there).
# Idempotent: writes $WB_NONFREE_SOURCES only when its content would change, and removes it when
# the existing sources already carry non-free. Returns 0 if the apt configuration changed (the
# caller must run apt-get update), 1 if nothing changed.
wb_enable_nonfree() {
    local want
    want="$(wb_nonfree_config)"
    if [ -z "$want" ]; then
        if [ -f "$WB_NONFREE_SOURCES" ]; then
            # Only reached when other sources already provide non-free: our file is redundant.
            wb_as_root rm -f "$WB_NONFREE_SOURCES"
            return 0
        fi
        return 1
    fi
    want="# Written by wbvmm's scripts/lib/common.sh (wb_enable_nonfree): Debian's non-free
# component, for the 'netperf' package. Safe to delete; the scripts write it again when needed.
$want"
    if [ -f "$WB_NONFREE_SOURCES" ] && [ "$(cat "$WB_NONFREE_SOURCES")" = "$want" ]; then
        return 1
    fi
    wb_log "enabling Debian's non-free component in $WB_NONFREE_SOURCES (for netperf)"
    printf '%s\n' "$want" | wb_as_root tee "$WB_NONFREE_SOURCES" >/dev/null
    return 0
}

# Does apt know a candidate version of PACKAGE? (needs up-to-date lists)
wb_apt_has_candidate() {
    local c
    c="$(apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2; exit }')"
    [ -n "$c" ] && [ "$c" != "(none)" ]
}
