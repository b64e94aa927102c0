#!/bin/sh
# pip in an image build (the Dockerfile's venv and train stages):
#
#   pip_install.sh deps REQUIREMENT...   the dependencies (wheels only, nothing compiled)
#   pip_install.sh project               the project in the current directory, no deps
#
# Wheels are downloaded into /wheels, a BuildKit cache mount (kept by the builder
# between builds, never part of a layer), and installed from there without the index.
# pip's own HTTP cache would not do: it keeps no file whose response carries no
# caching headers, as behind some proxies; a download folder keeps every wheel.
# The build secret `pip_cert` (the host pip's CA bundle) is trusted when given.
# Nothing is compiled to bytecode here: each stage decides which .pyc files it keeps.
set -eu
if [ -s /run/secrets/pip_cert ]; then
  export PIP_CERT=/run/secrets/pip_cert
fi
# The project's build requirements (setuptools), for the isolated build without the index.
build_requires=$(python -c 'import tomllib; print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))')
mode=$1
shift
case "$mode" in
  deps)
    # shellcheck disable=SC2086  # one word per build requirement
    pip download --progress-bar off --only-binary=:all: --dest /wheels "$@" $build_requires
    pip install --quiet --no-index --find-links /wheels --only-binary=:all: --no-compile "$@"
    ;;
  project)
    # shellcheck disable=SC2086
    pip download --quiet --only-binary=:all: --dest /wheels $build_requires
    pip install --quiet --no-index --find-links /wheels --no-deps --force-reinstall --no-compile .
    rm -rf build ./*.egg-info
    ;;
  *)
    echo "usage: pip_install.sh deps REQUIREMENT... | project" >&2
    exit 2
    ;;
esac
