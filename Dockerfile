# The sortloop worker for docker-compose.yml: `sortloop serve` (pull/push reviews, scan sorted trees, sort
# inboxes, nightly retrain -> gate -> deploy). Label Studio itself runs from its official image.
# Build: docker compose build worker   (or: docker build -t sortloop .)
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SORTLOOP_WORKSPACE=/workspace \
    OMP_NUM_THREADS=2

# An unprivileged user; the workspace, photo and served folders exist in the image so fresh named volumes
# get this user's ownership.
RUN useradd --create-home --uid 1000 sortloop \
 && mkdir -p /workspace /photos /served \
 && chown sortloop:sortloop /workspace /photos /served

WORKDIR /app
COPY pyproject.toml README.md ./
COPY loop ./loop
COPY labeling ./labeling
COPY sortloop ./sortloop
# The `train` extra (fastai) is needed for the nightly retrain; `ray` for the optional Ray head/workers
# (docker-compose profile "ray"), which run this same image. CPU wheels of torch/torchvision come from
# the PyTorch index (PyPI's default Linux build carries CUDA and is several GB larger). pip compiles
# bytecode at install time, which keeps `import fastai, timm` at ~8 s instead of ~25 s per process.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu '.[train,ray]'

USER sortloop
VOLUME ["/workspace"]
# --init creates the workspace (config with documented defaults) on the first start of an empty volume.
CMD ["sortloop", "serve", "--init"]
