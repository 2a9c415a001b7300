# The promptmill image for API and batch workers, Flower and the CLI (`docker compose` builds it).
# Stage 1 builds wheels of promptmill and everything it needs; stage 2 installs them into a slim
# image with no compiler, no pip cache and no source tree, running as an unprivileged user.
FROM python:3.11.14-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY config config
COPY jobs jobs
COPY pipelines pipelines
COPY reports reports
COPY workers workers
COPY promptmill promptmill
RUN pip wheel --quiet --wheel-dir /wheels ".[monitor]"

FROM python:3.11.14-slim-bookworm AS runtime
COPY --from=build /wheels /wheels
RUN pip install --quiet --no-cache-dir --no-index --find-links /wheels "promptmill[monitor]" \
    && rm -rf /wheels \
    && useradd --create-home --uid 1000 promptmill \
    && mkdir -p /data /models && chown promptmill /data /models
USER promptmill
WORKDIR /home/promptmill
ENV PROMPTMILL_DATA_DIR=/data PROMPTMILL_MODELS_DIR=/models PYTHONUNBUFFERED=1
CMD ["promptmill", "--help"]
