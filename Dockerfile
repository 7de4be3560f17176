# One image for every Python service; docker-compose.yml picks the command.
# Build stage: resolve and build wheels with the pinned versions (constraints.txt).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY smartgrid smartgrid
COPY gateway gateway
COPY balancer balancer
COPY substation substation
COPY loadgen loadgen
COPY stack stack
RUN pip wheel --no-cache-dir --wheel-dir /wheels -c constraints.txt .

# Final stage: no compilers, no pip cache, a non-root user.
FROM python:3.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin smartgrid
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index /wheels/*.whl && rm -rf /wheels
USER smartgrid
WORKDIR /home/smartgrid
CMD ["python", "-m", "gateway", "--help"]
