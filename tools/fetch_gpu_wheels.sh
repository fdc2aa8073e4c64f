#!/usr/bin/env bash
# Download the wheels ltscale's MLflow tracking needs on the GPU machine (Python 3.12, x86-64,
# no network) into .whl/ (ignored by git). The machine already has torch, torchvision, numpy,
# matplotlib, rich, pillow, requests, pyyaml, protobuf, click, cloudpickle, anyio, h11, zipp,
# markupsafe, pygments, packaging and annotated-doc; these are the rest of mlflow-skinny's needs.
# typing-extensions too: the machine's version is not recorded, and pydantic 2.14 (which mlflow
# imports) needs >= 4.16 (with 4.13, `import mlflow` fails: no 'Sentinel' in typing_extensions).
#
#   tools/fetch_gpu_wheels.sh           # ~9 MiB: enough for an MLflow file store (--tracking-store file)
#   tools/fetch_gpu_wheels.sh --sqlite  # ~20 MiB: also ltscale's default sqlite store
#
# Versions are those of the CPU development environment, where this exact set (installed with
# --no-deps into an empty venv beside the packages listed above) ran ltscale's tracker against
# both stores.
set -euo pipefail
cd "$(dirname "$0")/.."
CORE=(
  mlflow-skinny==3.17.2 cachetools==7.3.2 databricks-sdk==0.156.0 fastapi==0.165.0 starlette==1.10.0
  uvicorn==0.54.0 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0
  opentelemetry-api==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0
  typing-inspection==0.4.5 python-dotenv==1.2.4 sqlparse==0.6.1 google-auth==2.62.2 pyasn1==0.6.5
  pyasn1-modules==0.4.2 typing-extensions==4.16.0
)
SQLITE=(sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 greenlet==3.5.6 cryptography==50.0.2 cffi==2.1.1 pycparser==3.12)
WANT=("${CORE[@]}")
case "$#:${1:-}" in
  0:) ;;
  1:--sqlite) WANT+=("${SQLITE[@]}") ;;
  *) echo "usage: tools/fetch_gpu_wheels.sh [--sqlite]   (got: $*)" >&2; exit 2 ;;
esac
# Start from an empty .whl/: wheels of an earlier fetch (the --sqlite set, an older version beside a
# newer one) would travel too, past the 64 MiB carry limit or into a pip install that cannot resolve.
rm -rf .whl
mkdir -p .whl
"${PYTHON:-python3}" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_34_x86_64 \
  -d .whl "${WANT[@]}"
du -sh .whl
