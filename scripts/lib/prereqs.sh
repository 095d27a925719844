# Installs (as root on Debian) or names (otherwise) what Baton needs on this machine.
# Usage: ensure_prereqs run|test

pg_bin_dir() {
  if [ -n "${BATON_PG_BIN:-}" ]; then echo "$BATON_PG_BIN"; return; fi
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

ensure_prereqs() {
  local purpose="$1" missing=() hint=()
  local pg; pg="$(pg_bin_dir)"
  if [ -z "$pg" ] || [ ! -x "$pg/initdb" ]; then missing+=(postgresql); hint+=("PostgreSQL server binaries (initdb, pg_ctl)"); fi
  command -v cargo >/dev/null 2>&1 || { echo "cargo is not installed: install Rust (https://rustup.rs) first" >&2; exit 1; }
  if [ "$purpose" = test ]; then
    command -v python3 >/dev/null 2>&1 || { missing+=(python3); hint+=("python3 (runtime helper tests)"); }
    command -v node >/dev/null 2>&1 || { missing+=(nodejs); hint+=("node (runtime helper tests)"); }
    [ -x /usr/sbin/sshd ] && command -v ssh-keygen >/dev/null 2>&1 || { missing+=(openssh-server); hint+=("sshd and ssh-keygen (ssh executor tests)"); }
    command -v chromium >/dev/null 2>&1 || { missing+=(chromium); hint+=("chromium (the dashboard's browser test)"); }
    command -v chromedriver >/dev/null 2>&1 || { missing+=(chromium-driver); hint+=("chromedriver (the dashboard's browser test)"); }
  fi
  if [ "$purpose" = test ]; then
    command -v debootstrap >/dev/null 2>&1 || { missing+=(debootstrap); hint+=("debootstrap (builds the runtime image)"); }
  fi
  if [ "${#missing[@]}" -eq 0 ]; then return 0; fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "Missing: ${hint[*]}." >&2
    echo "Install the Debian packages: ${missing[*]} (as root: apt-get install -y ${missing[*]})" >&2
    exit 1
  fi
}

# The container executor's tests need a running Docker engine (it cannot be installed here).
ensure_docker() {
  if ! docker info >/dev/null 2>&1; then
    echo "A running Docker engine is needed for the container executor tests: install Docker" >&2
    echo "(apt-get install -y docker.io) and start it (dockerd), then run this again." >&2
    exit 1
  fi
}

# docker-compose (Debian's 1.29) for the compose stack test, unless `docker compose` (v2) works.
ensure_compose() {
  if docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing: docker-compose"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  else
    echo "The compose test needs docker-compose (apt-get install -y docker-compose) or the" >&2
    echo "docker compose plugin." >&2
    exit 1
  fi
}

# schemathesis (PyPI) for the OpenAPI fuzz test, in a virtual environment outside the clone,
# pinned and cached by version. Exports BATON_SCHEMATHESIS for tests/tests/fuzz.rs.
SCHEMATHESIS_VERSION=4.32.5
ensure_schemathesis() {
  local venv="${BATON_CACHE_DIR:-$HOME/.cache/baton}/venv-schemathesis-$SCHEMATHESIS_VERSION"
  if [ ! -x "$venv/bin/schemathesis" ]; then
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
        rm -rf "$venv"
        python3 -m venv "$venv"
      else
        echo "python3 cannot create a virtual environment: install python3-venv" >&2
        exit 1
      fi
    fi
    "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  export BATON_SCHEMATHESIS="$venv/bin/schemathesis"
}
