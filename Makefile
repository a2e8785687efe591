# Every target creates .venv if needed; a fresh machine needs only python3 and make.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-qemu test bench chaos netns-chaos netns-chaos-wan lint browser-check alerts-check corpus corpus-small qemu-guest clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,lint]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dwcp demo

# make test: everything but the long runs (marked slow), under 10 minutes on 2 cores;
# it ends with the 25 slowest tests, so the budget is watched on every run. It runs on
# TEST_WORKERS pytest-xdist workers (one per core here); the tests that boot QEMU, build
# network namespaces or kill -9 real replicas share one group and never overlap
# (tests/harness/groups.py). `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" --durations=25 \
		-n $(TEST_WORKERS) --dist loadgroup tests

# make chaos: every test with the long hypothesis profile, then the long runs: the PBFT
# sweeps of issue 14 (10,000 seeds each, f = 1 and f = 2, on every core).
chaos: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q -p no:cacheprovider tests
	$(BIN)/dwcp sim sweep pbft-crashpoints --seeds 0-9999 --run-timeout 600
	$(BIN)/dwcp sim sweep pbft-crashpoints --seeds 0-9999 --nodes 7 --run-timeout 600
	$(BIN)/dwcp sim sweep pbft-swarm --seeds 0-9999 --run-timeout 600
	$(BIN)/dwcp sim sweep pbft-swarm --seeds 0-9999 --nodes 7 --run-timeout 600
	$(MAKE) netns-chaos SEEDS=1-100
	$(MAKE) netns-chaos-wan SEEDS=1-20

# make netns-chaos: every DC's node in its own network namespace behind a tbf-shaped
# veth link to a bridge, faults by seed (link down, one direction dropped, kill -9,
# SIGSTOP, restart, full disk) while image VMs and the QEMU guest migrate; the checker
# after each seed's heal (docs/simulator.md, "Real processes on real links"). Needs root.
SEEDS ?= 1-100
netns-chaos: $(STAMP)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2
	nice -n 10 $(BIN)/python -m bench.netns_chaos --seeds $(SEEDS) --json $(NETNS_CHAOS_ARGS)

# make netns-chaos-wan SEEDS=A-B: the same with WAN latency: every DC's connections
# through a delay relay in its namespace (bench/netns_wan.py: 13-118 ms one way, the
# simulator's geo preset), and the relay's kill -9 among the faults.
netns-chaos-wan: $(STAMP)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iproute2
	nice -n 10 $(BIN)/python -m bench.netns_chaos --seeds $(SEEDS) --json --wan $(NETNS_CHAOS_ARGS)

bench: $(STAMP)
	$(BIN)/python -m bench.all

# make browser-check: the dashboard of a running node, loaded in a real (headless)
# Chromium; make test runs the same test only where a Chromium is installed.
browser-check: $(STAMP)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium-headless-shell
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_dashboard.py -k real_browser

# make alerts-check: the Prometheus alert rules (docs/deploy/prometheus/alerts.yml) through
# promtool (Debian's prometheus package); make test runs the same test where promtool is.
alerts-check: $(STAMP)
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_alerts.py

lint: $(STAMP)
	$(BIN)/ruff check mesh consensus federation sim bench tests
	$(BIN)/mypy mesh consensus federation sim

# make corpus: real VM state (guest RAM snapshots, ext4 images) in $$DWCP_CORPUS
# (default ~/.cache/dwcp-corpus), see docs/CORPUS.md; corpus-small: 256 MiB guest.
CORPUS_DEBS := qemu-system-x86 linux-image-cloud-amd64 busybox-static e2fsprogs cpio zstd
corpus: $(STAMP)
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CORPUS_DEBS)
	$(BIN)/python -m bench.corpus.build $(CORPUS_ARGS)

corpus-small: CORPUS_ARGS = --small
corpus-small: corpus

# make qemu-guest: the self-checking guest (kernel + busybox initramfs) the qemu backend's
# tests, `dwcp bench live` and the qemu demo boot, in $$DWCP_GUEST (default
# ~/.cache/dwcp-guest), see docs/qemu.md.
QEMU_GUEST_DEBS := qemu-system-x86 linux-image-cloud-amd64 busybox-static cpio iproute2
qemu-guest: $(STAMP)
	apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(QEMU_GUEST_DEBS)
	$(BIN)/python -m federation.demo.qemu_guest.build

# make demo-qemu: four DC nodes, the self-checking guest booted at dc1 (TCG), live-migrated
# to dc3 while its checks run and back, with bytes, time and downtime (docs/qemu.md).
# Installs QEMU and builds the guest first, as make qemu-guest does.
demo-qemu: qemu-guest
	$(BIN)/dwcp demo-qemu

clean:
	rm -rf $(VENV) build *.egg-info
