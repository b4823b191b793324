# kdpipe's runtime for a Prefect Docker work pool on GPU hosts (prefect.docker.yaml builds and registers it).
# The image holds the environment; each flow run still clones the repository at the deployment's ref (the pull
# steps), so code changes need no new image, only dependency changes (pyproject.toml) do.
#   docker build -t kdpipe:gpu .        # then: docker run --rm --gpus all kdpipe:gpu kdpipe check-params
FROM python:3.11-slim

# git: DVC and the pull steps' git clone need it. No compilers: every dependency ships wheels.
RUN apt-get update && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 \
    KDPIPE_INSTALL=0

WORKDIR /opt/kdpipe

# Dependencies first, in their own layer: rebuilt only when pyproject.toml changes. torch and torchvision are
# pinned there (2.14.1 / 0.29.1); PyPI's Linux x86_64 wheels of this torch are the CUDA build.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (the `kdpipe` command; runs use the clone's code, which comes first on sys.path).
COPY kdpipe ./kdpipe
RUN pip install --no-deps .
