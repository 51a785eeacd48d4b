#!/usr/bin/env bash
# Set up a Jetson Orin Nano (JetPack 6 / L4T R36) to run the roadshield edge loop as a
# hardened systemd service. Run it from a checkout, as root; running it again is safe.
#
#   sudo scripts/jetson/setup.sh --bundle bundle/ --trust-key bundle.pub \
#       --actuator-key board.key [--start]
#   scripts/jetson/setup.sh --dry-run ...     # print every step, change nothing
#
# It checks the release, creates the system user `roadshield` (groups dialout and video,
# no login shell), installs the kit into /opt/roadshield/venv on top of JetPack's own
# TensorRT and OpenCV (--system-site-packages), builds the CUDA kernels, installs the
# unit, the udev rule and the engine-preparing helper, lays out /etc/roadshield and
# /var/lib/roadshield, reloads udev and systemd and enables the unit.
set -euo pipefail

UNIT=roadshield-edge.service
SERVICE_USER=roadshield
PREFIX=/opt/roadshield
VENV=$PREFIX/venv
ETC=/etc/roadshield
STATE=/var/lib/roadshield
LOGS=/var/log/roadshield
# the release file is read from here (a test points it at a fixture)
NV_TEGRA_RELEASE=${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$(cd "$HERE/../.." && pwd)

DRY_RUN=0
START=0
BUNDLE=""
TRUST_KEY=""
ACTUATOR_KEY=""

usage() {
    sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    cat <<'EOF'

Options:
  --bundle DIR         signed bundle to install as /var/lib/roadshield/bundle
  --trust-key KEY      the publisher's bundle.pub, or its bundle.trust.json to let the key
                       expire, installed as /etc/roadshield/bundle.pub
  --actuator-key FILE  the board's key file (`roadshield actuator provision`), installed as
                       /etc/roadshield/actuator.key, mode 0600, owned by roadshield
  --start              start (or restart) the service once it is enabled
  --dry-run            print each step instead of doing it
  -h, --help           this text
EOF
}

die() {
    echo "setup.sh: error: $*" >&2
    exit 2
}

# one word as the shell would need it typed: as is when plain, else in single quotes
quote() {
    if [[ $1 =~ ^[A-Za-z0-9_./=:@%+,-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# run CMD...: do it, or with --dry-run print it (quoted for a shell) instead
run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '+'
        local word
        for word in "$@"; do
            printf ' '
            quote "$word"
        done
        printf '\n'
    else
        "$@"
    fi
}

step() {
    printf '== %s\n' "$*"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        --trust-key) TRUST_KEY=${2:?--trust-key needs a file}; shift 2 ;;
        --actuator-key) ACTUATOR_KEY=${2:?--actuator-key needs a file}; shift 2 ;;
        --start) START=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option $1" ;;
    esac
done

[[ -z $BUNDLE || -f $BUNDLE/model.sig ]] || die "$BUNDLE is not a signed bundle (no model.sig)"
[[ -z $TRUST_KEY || -f $TRUST_KEY ]] || die "trust key $TRUST_KEY does not exist"
[[ -z $ACTUATOR_KEY || -f $ACTUATOR_KEY ]] || die "actuator key $ACTUATOR_KEY does not exist"

step "checking the release: JetPack 6 (L4T R36)"
[[ -r $NV_TEGRA_RELEASE ]] || die "$NV_TEGRA_RELEASE is missing: this is not a Jetson with L4T"
# first line, e.g. "# R36 (release), REVISION: 4.3, GCID: ..., BOARD: generic, EABI: aarch64"
release=$(head -n 1 "$NV_TEGRA_RELEASE")
if [[ $release =~ ^#\ R([0-9]+)\ \(release\),\ REVISION:\ ([0-9.]+) ]]; then
    l4t_major=${BASH_REMATCH[1]}
    l4t_revision=${BASH_REMATCH[2]}
else
    die "cannot read the L4T release from $NV_TEGRA_RELEASE: '$release'"
fi
[[ $l4t_major == 36 ]] || die "L4T R$l4t_major.$l4t_revision is not JetPack 6 (L4T R36):" \
    "flash JetPack 6 (TensorRT 10, CUDA 12.6, Python 3.10)"
echo "L4T R$l4t_major.$l4t_revision"

if [[ $(id -u) != 0 ]]; then
    [[ $DRY_RUN == 1 ]] || die "run it as root (sudo $0 ...)"
    echo "(not root: fine for a dry run; the real run needs sudo)"
fi

step "system packages: venv, headers for pycuda, TensorRT's python bindings"
run apt-get install -y --no-install-recommends python3-venv python3-dev python3-libnvinfer

step "service user $SERVICE_USER: system account, groups dialout and video, no login shell"
if id "$SERVICE_USER" >/dev/null 2>&1; then
    run usermod --append --groups dialout,video --shell /usr/sbin/nologin "$SERVICE_USER"
else
    run useradd --system --user-group --groups dialout,video --shell /usr/sbin/nologin \
        --home-dir "$STATE" --no-create-home --comment "roadshield edge loop" "$SERVICE_USER"
fi

step "the kit in $VENV, on JetPack's TensorRT and OpenCV (--system-site-packages)"
run install -d -m 0755 -o root -g root "$PREFIX" "$PREFIX/bin"
if [[ ! -x $VENV/bin/python ]]; then
    run python3 -m venv --system-site-packages "$VENV"
fi
# numpy below 2: JetPack's cv2 is built against numpy 1.x; no opencv-python from pip (it
# has no GStreamer and would hide the system cv2)
run "$VENV/bin/python" -m pip install --upgrade "numpy>=1.24,<2" "$SRC[jetson]"
# the venv must see JetPack's TensorRT bindings and its cv2 with GStreamer (csi:// capture)
run "$VENV/bin/python" -c 'import re, cv2, tensorrt
assert re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()), "cv2 has no GStreamer"
print("TensorRT", tensorrt.__version__, "and cv2", cv2.__version__, "with GStreamer")'

step "CUDA kernels, built on this device into $PREFIX/kernels"
run env PATH="/usr/local/cuda/bin:$PATH" ROADSHIELD_KERNEL_BUILD="$PREFIX/kernels" \
    "$VENV/bin/python" -m kernels.build

step "the unit, the engine-preparing helper and the actuator's udev rule"
run install -m 0755 -o root -g root "$HERE/prepare_engine.py" "$PREFIX/bin/roadshield-prepare-engine"
run install -m 0644 -o root -g root "$HERE/$UNIT" "/etc/systemd/system/$UNIT"
run install -m 0644 -o root -g root "$SRC/actuator/99-roadshield-actuator.rules" \
    /etc/udev/rules.d/99-roadshield-actuator.rules

step "configuration and keys in $ETC (read-only to the service)"
run install -d -m 0750 -o root -g "$SERVICE_USER" "$ETC"
if [[ ! -e $ETC/edge.env ]]; then  # kept once there: it holds the operator's settings
    run install -m 0640 -o root -g "$SERVICE_USER" "$HERE/roadshield-edge.env" "$ETC/edge.env"
fi
if [[ -n $TRUST_KEY ]]; then
    # public, but owned by root: the service must not be able to swap the key it trusts
    run install -m 0640 -o root -g "$SERVICE_USER" "$TRUST_KEY" "$ETC/bundle.pub"
fi
if [[ -n $ACTUATOR_KEY ]]; then
    run install -m 0600 -o "$SERVICE_USER" -g "$SERVICE_USER" "$ACTUATOR_KEY" "$ETC/actuator.key"
fi

step "state in $STATE: the bundle read-only to the service, the engine cache its own"
run install -d -m 0750 -o root -g "$SERVICE_USER" "$STATE"
run install -d -m 0700 -o "$SERVICE_USER" -g "$SERVICE_USER" "$STATE/engines"
run install -d -m 0750 -o "$SERVICE_USER" -g "$SERVICE_USER" "$LOGS"
if [[ -n $BUNDLE ]]; then
    # a new copy beside the old, then swapped in: a failed copy leaves the old bundle
    run rm -rf "$STATE/bundle.new" "$STATE/bundle.old"
    run cp -R "$BUNDLE" "$STATE/bundle.new"
    run chown -R "root:$SERVICE_USER" "$STATE/bundle.new"
    run chmod -R u=rwX,g=rX,o= "$STATE/bundle.new"
    if [[ -e $STATE/bundle ]]; then
        run mv "$STATE/bundle" "$STATE/bundle.old"
    fi
    run mv "$STATE/bundle.new" "$STATE/bundle"
    run rm -rf "$STATE/bundle.old"
elif [[ ! -e $STATE/bundle ]]; then
    run install -d -m 0750 -o root -g "$SERVICE_USER" "$STATE/bundle"
    echo "no --bundle given: copy a signed bundle into $STATE/bundle before starting"
fi

step "reloading udev and systemd, enabling $UNIT"
run udevadm control --reload
run udevadm trigger --subsystem-match=tty --action=add
run systemctl daemon-reload
run systemctl enable "$UNIT"
if [[ $START == 1 ]]; then
    run systemctl restart "$UNIT"
fi

step "done"
echo "start:   sudo systemctl start $UNIT   (the first start builds the TensorRT engine)"
echo "logs:    journalctl -u ${UNIT%.service} -f"
echo "state:   systemctl status $UNIT   (STATUS= line from the loop)"
