"""docker-compose.yml stays consistent with the CLI: every service runs a real promptmill subcommand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from promptmill.cli import app
from promptmill.workers import metrics
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def test_every_compose_service_runs_a_real_promptmill_subcommand() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    servers = {"redis", "vllm-server", "prometheus", "grafana"}  # images of their own, not promptmill
    commands = {name: " ".join(service["command"]) for name, service in services.items() if name not in servers}
    known = {command.name or command.callback.__name__ for command in app.registered_commands}
    for name, command in commands.items():
        used = re.findall(r"promptmill ([a-z-]+)", command)
        assert used, f"service {name} runs no promptmill command"
        assert set(used) <= known, f"service {name} runs unknown subcommands {set(used) - known}"
    redis_command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis_command and "--requirepass" in redis_command
    assert "${REDIS_PASSWORD" in COMPOSE.read_text()  # from the environment, never written in the file
    # The vLLM server serves the model the promptmill services build, where their OPENAI_BASE_URL points.
    server = services["vllm-server"]
    assert "--served-model-name" in server["command"] and "/models" in " ".join(server["volumes"])
    assert "vllm-server:8000/v1" in str(services["api-worker"]["environment"]["OPENAI_BASE_URL"])
    # Prometheus scrapes each worker service on the port its workers serve their metrics on.
    scraped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = scraped["scrape_configs"][0]["dns_sd_configs"][0]
    for name in targets["names"]:
        assert f"--metrics-port {targets['port']}" in " ".join(services[name]["command"])


def test_promptmill_services_run_images_built_from_the_repo_s_dockerfiles_with_nothing_installed_at_start() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    built = {name: service for name, service in services.items() if "build" in service}
    assert set(built) == {"api-worker", "batch-worker", "gpu-worker", "flower", "submit"}
    assert all("pip install" not in " ".join(service.get("command", [])) for service in services.values())
    assert built["gpu-worker"]["build"]["dockerfile"] == "Dockerfile.gpu"
    assert {service["build"]["dockerfile"] for name, service in built.items() if name != "gpu-worker"} == {"Dockerfile"}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources = {"promptmill", *pyproject["tool"]["setuptools"]["package-dir"].values()}
    for dockerfile, base in (("Dockerfile", "python:3.11"), ("Dockerfile.gpu", "vllm/vllm-openai")):
        text = (ROOT / dockerfile).read_text()
        stages = re.findall(r"^FROM (\S+) AS (\w+)", text, re.MULTILINE)
        assert len(stages) == 2 and stages[-1][0].startswith(base), stages  # a build stage, then the image
        copied = set(re.findall(r"^COPY (\w+) \1$", text, re.MULTILINE))
        assert copied == sources, f"{dockerfile} builds the wheel from {copied}, the package is {sources}"
        assert "COPY --from=build /wheels" in text
    assert "RUN promptmill prepare-model" in (ROOT / "Dockerfile.gpu").read_text()


def test_the_grafana_dashboard_graphs_only_metrics_the_workers_serve() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "promptmill.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    served = {metric._name for metric in vars(metrics).values() if isinstance(metric, MetricWrapperBase)}
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name) for expr in exprs for name in re.findall(r"promptmill_\w+", expr)}
    assert used and used <= served, used - served
    assert {"promptmill_requests", "promptmill_rows", "promptmill_request_duration_seconds"} <= used
    # The data source it names is the one Grafana is given, pointing at the compose file's Prometheus.
    source = yaml.safe_load((ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert source["datasources"][0]["uid"] == dashboard["panels"][0]["datasource"]["uid"]
    assert source["datasources"][0]["url"] == "http://prometheus:9090"


def test_nothing_is_open_without_a_secret_and_nothing_is_published_beyond_this_machine() -> None:
    text = COMPOSE.read_text()
    services = yaml.safe_load(text)["services"]
    published = {name: service["ports"] for name, service in services.items() if "ports" in service}
    assert set(published) == {"flower", "prometheus", "grafana", "vllm-server"}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    assert "${FLOWER_BASIC_AUTH:?" in str(services["flower"]["environment"]["FLOWER_BASIC_AUTH"])
    assert "${GRAFANA_ADMIN_PASSWORD:?" in str(services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    # The vLLM server asks every request for the workers' key, and will not start without one.
    server = services["vllm-server"]
    assert server["environment"]["VLLM_API_KEY"] == "${OPENAI_API_KEY:-}"
    assert 'test -n "$$VLLM_API_KEY" || {' in " ".join(server["entrypoint"]) and "exit 1" in " ".join(server["entrypoint"])
    assert services["api-worker"]["environment"]["OPENAI_API_KEY"] == "${OPENAI_API_KEY:-}"
    # Workers serve metrics inside the compose network, for Prometheus; none of their ports is published.
    assert services["api-worker"]["environment"]["PROMPTMILL_METRICS_ADDRESS"] == "0.0.0.0"
    # Every image is pinned by version, the images built here too, and neither runs as root.
    assert all(re.search(r":v?\d+\.\d+", service["image"]) for name, service in services.items() if "build" not in service)
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        dockerfile_text = (ROOT / dockerfile).read_text()
        bases = re.findall(r"^FROM (\S+)", dockerfile_text, re.MULTILINE)
        assert all(re.search(r":v?\d+\.\d+\.\d+", base) for base in bases), (dockerfile, bases)
        users = re.findall(r"^USER (\S+)", dockerfile_text, re.MULTILINE)
        assert users and users[-1] not in ("root", "0"), (dockerfile, users)


SECRETS = {"REDIS_PASSWORD": "compose-check", "FLOWER_BASIC_AUTH": "user:pass", "GRAFANA_ADMIN_PASSWORD": "grafana-check"}


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose is not installed here")
def test_compose_file_validates_and_refuses_to_run_without_its_secrets() -> None:
    def config(env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(["docker-compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                              env={**os.environ, **env})  # fmt: skip

    result = config(SECRETS)
    assert result.returncode == 0, result.stderr
    for secret in SECRETS:
        missing = config({name: value for name, value in SECRETS.items() if name != secret})
        assert missing.returncode != 0 and secret in missing.stderr, (secret, missing.stderr)
