#!/usr/bin/env bash
# The built wheel works on its own: build it, install it into a fresh virtualenv outside the checkout,
# and from a folder outside the checkout run `align-runner --help`, `--version`, tab completion and
# a tiny pipeline. (A wheel without its config tree used to fail `--help` with FileNotFoundError.)
#   bash scripts/check_wheel.sh        # called by .ci/run after the tests; ~1 min on 2 CPU cores
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/align_runner-wheel.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
unset PYTHONPATH  # the checkout must not leak into the venv
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

# build from a copy of the checkout's files: setuptools packs whatever its build/ folder holds, so a
# stale build/ in the checkout could put files into the wheel that a clean build leaves out
mkdir "$tmp/src"
git -C "$repo" ls-files -z --cached --others --exclude-standard \
  | tar -C "$repo" --null -T - --ignore-failed-read -cf - | tar -xf - -C "$tmp/src"
python3 -m pip wheel --quiet --no-deps --no-build-isolation -w "$tmp/dist" "$tmp/src"
wheel=$(ls "$tmp"/dist/align_runner-*.whl)
echo "check_wheel: built $(basename "$wheel")"

# --system-site-packages: torch & co. come from this machine, not a fresh download. The editable
# install of the checkout is visible there too, so the venv's own copy must be the one imported.
python3 -m venv --system-site-packages "$tmp/venv"
py="$tmp/venv/bin/python" app="$tmp/venv/bin/align-runner"
"$py" -m pip install --quiet --no-deps "$wheel"

mkdir "$tmp/work" && cd "$tmp/work"
location=$("$py" -c "import align_runner; print(align_runner.__file__)")
echo "check_wheel: align_runner imported from $location"
case "$location" in
  "$tmp/venv/"*) ;;
  *) fail "align_runner came from $location, not the wheel installed in $tmp/venv" ;;
esac

"$app" --help > help.txt || fail "align-runner --help exited with $?"
grep -q "Config groups" help.txt && grep -q "algorithm: .*dpo" help.txt || fail "--help lists no config groups"

version=$("$py" -c "import align_runner; print(align_runner.__version__)")
[ "$("$app" --version)" = "align_runner $version" ] || fail "align-runner --version printed '$("$app" --version)', wanted 'align_runner $version'"

"$app" -sc install=bash | grep -q "_align_runner_complete align-runner" || fail "-sc install=bash names no align-runner"
choices=$(COMP_LINE="align-runner algorithm=d" COMP_POINT=24 "$app" -sc query=bash)
[[ " $choices " == *" algorithm=dpo "* ]] || fail "completion of 'algorithm=d' gave '$choices'"

# the tiny model is built offline from its config; the demo data ships in the wheel
"$app" model=tiny pipeline.eval=false data.sft.train.limit=32 data.sft.eval.limit=8 train.max_steps=2 \
  train.progress=false "paths.outputs=$tmp/outputs" "paths.cache=$tmp/cache" > run.log 2>&1 \
  || { cat run.log; fail "the tiny pipeline exited with $?"; }
ls "$tmp"/outputs/*/*/run.json > /dev/null 2>&1 || { cat run.log; fail "the tiny pipeline wrote no run.json"; }
echo "check_wheel: OK ($version: --help, --version, completion, tiny pipeline from $tmp/venv)"
