# Sourced by the bench scripts: makes `sla2` callable from this checkout on a GPU image that has torch and
# triton but not the CLI's pure-Python dependencies (pass their wheel folder as $1 to install them).
wheels=${1:-}
if [ -n "$wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$wheels"/*.whl
    export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
sla2() { python3 -c 'import sys; sys.argv[0] = "sla2"; from sla2cli.cli import main; main()' "$@"; }
