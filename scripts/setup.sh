#!/bin/sh
# Makes a fresh Debian 12 ready for nix-deploy's demo, tests and benchmarks,
# as root. Idempotent: it changes only what is missing, and says what it
# changed. It never edits a Nix configuration the machine already has.
#
# - Debian packages: nix-bin (the coordinator's own Nix), openssh-client and
#   openssh-server (our SSH, and the local test hosts' sshd), sudo (test hosts
#   with a non-root deploy user), xz-utils (the nixpkgs lib fixture), git
#   (tests of flakes pinned to a commit, and pull mode), postgresql (the
#   tests' throwaway PostgreSQL servers: each test process runs its own
#   `initdb` and `postgres` in a temporary directory, on a unix socket only;
#   installing it starts no server and creates no cluster), prometheus (only
#   for its `promtool`: the tests check the example alerting rules with it;
#   its service is not started), python3-aiosmtpd (the tests' SMTP server
#   for alert e-mails, started on loopback by each test), chromium,
#   chromium-driver and fonts-liberation (the web dashboard's browser tests
#   and benchmark drive headless Chromium through WebDriver and take
#   screenshots).
# - /nix: Debian's nix-bin does not create it, and the test hosts bind-mount
#   their own store over it, so it must exist before the first host starts.
# - /etc/machine-id: each test host bind-mounts its own machine id over it;
#   a minimal Debian (debootstrap, containers) has none.
#
# Builds: Debian's nix-bin runs single-user as root, with Nix's default
# `build-users-group = nixbld`, a group nothing creates. Rather than adding a
# group and build users to the machine, the project's own Nix invocations
# (test fleet, demo, benchmarks) run with `build-users-group =` in NIX_CONFIG
# (see the testkit's `nix_config`), together with flakes on, no sandbox and no
# substituters. Nothing global changes, and a machine whose Nix already has
# build users or a daemon keeps them.
set -eu

if [ "$(id -u)" != 0 ]; then
    echo "setup: the local test hosts need root (mount namespaces, sshd); run as root" >&2
    exit 1
fi

changed=""
note() {
    echo "setup: $*" >&2
    changed=yes
}

missing=""
command -v nix >/dev/null 2>&1 || missing="$missing nix-bin"
{ command -v ssh >/dev/null 2>&1 && command -v ssh-keygen >/dev/null 2>&1; } || missing="$missing openssh-client"
[ -x /usr/sbin/sshd ] || missing="$missing openssh-server"
command -v sudo >/dev/null 2>&1 || missing="$missing sudo"
command -v xz >/dev/null 2>&1 || missing="$missing xz-utils"
{ command -v unshare >/dev/null 2>&1 && command -v setsid >/dev/null 2>&1; } || missing="$missing util-linux"
command -v mount >/dev/null 2>&1 || missing="$missing mount"
command -v git >/dev/null 2>&1 || missing="$missing git"
command -v setpriv >/dev/null 2>&1 || missing="$missing util-linux"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$missing postgresql"
command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
/usr/bin/python3 -c 'import aiosmtpd' >/dev/null 2>&1 || missing="$missing python3-aiosmtpd"
[ -x /usr/bin/chromium ] || missing="$missing chromium"
[ -x /usr/bin/chromedriver ] || missing="$missing chromium-driver"
# Chromium only recommends a font; without one, screenshots show boxes.
[ -d /usr/share/fonts/truetype/liberation ] || missing="$missing fonts-liberation"
if [ -n "$missing" ]; then
    note "installing Debian packages:$missing"
    apt-get update -qq
    # Installing openssh-server, postgresql or prometheus must not start a
    # system sshd on port 22, a PostgreSQL server on 5432 or a Prometheus on
    # 9090: the tests run their own, and a fresh machine may not want them.
    policy=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy=yes
    fi
    # Nor a `main` cluster in /var/lib/postgresql that nothing uses.
    case "$missing" in
        *postgresql*)
            mkdir -p /etc/postgresql-common/createcluster.d
            [ -e /etc/postgresql-common/createcluster.d/nix-deploy.conf ] ||
                echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/nix-deploy.conf
            ;;
    esac
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
    [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
fi

if [ ! -d /nix ]; then
    note "creating /nix (the Nix store's root; Debian's nix-bin leaves it to the first build)"
    mkdir -m 0755 /nix
fi

# A bind mount needs a file to mount over. A fresh id, as
# systemd-machine-id-setup would write it, for a machine that had none.
if [ ! -e /etc/machine-id ]; then
    note "creating /etc/machine-id (the test hosts mount their own machine ids over it)"
    tr -d '-' < /proc/sys/kernel/random/uuid > /etc/machine-id
    chmod 444 /etc/machine-id
fi

# Debian installs / as 755. The test hosts' non-root deploy user (logging
# in over ssh, running sudo) must be able to walk from /; a root directory
# closed to other users (as some images and containers have) refuses it.
case "$(stat -c %A /)" in
    *x) ;;
    *)
        note "letting other users traverse / (chmod o+x /, as a Debian install has it): the test hosts' non-root user logs in through it"
        chmod o+x /
        ;;
esac

[ -n "$changed" ] || echo "setup: nothing to do (Nix, OpenSSH, sudo, git, PostgreSQL, promtool, aiosmtpd, Chromium and /nix are in place)" >&2
