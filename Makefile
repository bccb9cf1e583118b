# ctct-relay developer commands. `make demo` and `make test` work on a fresh machine with Python >= 3.11.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist worker processes for `make test`: most tests wait on brokers, timers and
# subprocesses, so more workers than cores pay (tests/turns.py: tests marked serial run alone).
PYTEST_WORKERS ?= 3
DEMO_ARGS ?=

.PHONY: venv demo test lint format bench sim kafka kafka-jars check-java postgres-server clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "ctct-relay needs Python >= 3.11, found " + sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/ctct-relay demo $(DEMO_ARGS)

sim: venv
	$(BIN)/ctct-relay sim --config config/sim.example.yaml

# Deployment files are linted without a Docker engine or a cluster: hadolint, the Kubernetes
# schemas of K8S_VERSION (shipped in kubernetes-validate, offline) and `docker-compose config`
# (the Compose specification schema built into the compose CLI; the token only satisfies ${...:?}).
K8S_VERSION := 1.33.0
K8S_MANIFESTS := $(filter-out deploy/k8s/kustomization.yaml,$(sort $(wildcard deploy/k8s/*.yaml)))

lint: venv
	$(BIN)/ruff check relay tests bench deploy
	$(BIN)/ruff format --check relay tests bench deploy
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	$(BIN)/kubernetes-validate --kubernetes-version $(K8S_VERSION) --strict --quiet $(K8S_MANIFESTS)
	CTCT_RELAY_ADMIN_TOKEN=lint $(BIN)/docker-compose -f deploy/docker-compose.yml config --quiet

format: venv
	$(BIN)/ruff format relay tests bench deploy
	$(BIN)/ruff check --fix relay tests bench deploy

# The Kafka tests run a real Apache Kafka broker built from Maven Central: Java 17+ and Maven.
check-java:
	@command -v java >/dev/null 2>&1 && command -v mvn >/dev/null 2>&1 || { \
	  echo "make test needs Java 17+ and Maven for the Kafka broker tests."; \
	  echo "Install them, e.g.: apt-get install openjdk-17-jre-headless maven"; exit 1; }
	@java -version 2>&1 | head -1 | grep -qE 'version "(1[7-9]|[2-9][0-9])' || { \
	  echo "make test needs Java 17 or newer; found: $$(java -version 2>&1 | head -1)"; exit 1; }

# Fetch the Kafka jars (cached in .cache/kafka) before the tests, so no test waits on Maven.
kafka-jars: venv check-java
	$(BIN)/python -c "from relay.devkafka import ensure_kafka; print('kafka jars:', ensure_kafka().libs_dir)"

kafka: kafka-jars
	$(BIN)/ctct-relay dev-kafka

# The PostgreSQL tests start a throwaway cluster: the server binaries are installed here (apt-get,
# as root) when missing, so no test waits on apt. RELAY_TEST_POSTGRES_URL / DATABASE_URL name a
# server to use instead.
postgres-server: venv
	$(BIN)/python -m tests.pgkit --ensure

test: lint kafka-jars postgres-server
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

# Every benchmark in turn (bench/throughput.py starts a dev broker unless KAFKA_BOOTSTRAP_SERVERS
# is set, hence the jars); a failing one stops the run.
BENCHES := $(filter-out bench/__init__.py,$(sort $(wildcard bench/*.py)))

bench: venv kafka-jars postgres-server
	@set -e; for script in $(BENCHES); do echo "== $$script"; $(BIN)/python $$script; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
