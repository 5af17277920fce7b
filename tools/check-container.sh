#!/usr/bin/env bash
# Checks the container files without a Docker engine: hadolint on the Dockerfile (any
# finding fails, style included), ShellCheck on the image's healthcheck and on this
# script, and Docker Compose's own validation of deploy/compose.yaml (`config`, which
# parses, interpolates and checks the file against the Compose schema without a
# daemon). The linters are the pinned PyPI wheels of deploy/lint-requirements.txt, each
# carrying the real binary, installed into .venv (created with `python3 -m venv` if
# missing) when the list changed since the last install. Needs Python 3 with venv and
# PyPI; a few seconds once installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
if ! cmp -s deploy/lint-requirements.txt .venv/kythera-lint-requirements.txt; then
    .venv/bin/pip install -q --disable-pip-version-check -r deploy/lint-requirements.txt
    cp deploy/lint-requirements.txt .venv/kythera-lint-requirements.txt
fi

echo "== hadolint $(.venv/bin/hadolint --version | grep -o '[0-9][0-9.]*$'): Dockerfile"
.venv/bin/hadolint --no-color --failure-threshold style Dockerfile

echo "== shellcheck $(.venv/bin/shellcheck --version | sed -n 's/^version: //p'): healthcheck, this script"
.venv/bin/shellcheck deploy/healthcheck.sh tools/check-container.sh

echo "== docker-compose $(.venv/bin/docker-compose version --short) config: deploy/compose.yaml"
.venv/bin/docker-compose -f deploy/compose.yaml config --quiet

echo "container files: no findings"
