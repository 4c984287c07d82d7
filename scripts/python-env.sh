# Sourced by the Python package's scripts (python-test.sh, bench-python.sh): the repository root,
# the build folder, and the virtualenv the package goes into ($LOCI_VENV, default beside the
# build), made if missing; `pip` runs in it, `install_loci` installs the package from source and
# builds the `loci` binary its results are compared with.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/loci-target}"
venv="${LOCI_VENV:-$CARGO_TARGET_DIR/python-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@"; }
install_loci() {
  pip install "$root/python"
  cargo build --release -p loci-backend --bin loci
}
