# Development entry points. `make test` and `make demo` work on a fresh machine:
# they run `make setup` first, which installs what is missing.

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done
COLLECTION_LINK := .collections/ansible_collections/thinair/ovirt
SYSTEM_PACKAGES := qemu-utils qemu-system-x86 nbdkit gcc libxml2-dev libcurl4-openssl-dev libssl-dev openssl e2fsprogs libdevmapper1.02.1
PYTEST := $(PY) -m pytest -p no:cacheprovider

.PHONY: setup system-packages test lint sanity unit integration molecule demo demo-transfer bench clean

setup: $(STAMP) $(COLLECTION_LINK)

system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  if [ "$$(id -u)" != 0 ]; then echo "run as root or install:$$missing" >&2; exit 1; fi; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(STAMP): tests/requirements.txt | system-packages
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip wheel setuptools
	$(VENV)/bin/pip install -q -r tests/requirements.txt
	touch $@

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn ../../.. $@

test: setup lint sanity unit integration molecule

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/ansible-lint

# ansible-test resolves the real path of the collection, so it runs on a copy
# of the tracked files placed under ansible_collections/thinair/ovirt (outside
# any hidden directory, which it would skip). The lab and the benchmarks are
# not part of the collection (see build_ignore) and are left out. Its sanity
# environments get pip from tests/sanity/get_pip_offline.py.
sanity: setup
	@pip_version=$$(grep -oP "pip='\K[0-9.]+" $(VENV)/lib/python3*/site-packages/ansible_test/_internal/python_requirements.py); \
	  mkdir -p $(HOME)/.ansible/test/cache && \
	  cp tests/sanity/get_pip_offline.py $(HOME)/.ansible/test/cache/get_pip_$$(echo $$pip_version | tr . _).py
	@work=$$(mktemp -d /tmp/thinair-sanity.XXXXXX) && trap 'rm -rf "$$work"' EXIT && \
	  dest=$$work/ansible_collections/thinair/ovirt && mkdir -p $$dest && \
	  git ls-files -z --cached --others --exclude-standard -- . ':!lab' ':!bench' | \
	    xargs -0 -I{} sh -c 'test -e "{}" && cp --parents "{}" '"$$dest"'/ || true' && \
	  cd $$dest && $(CURDIR)/$(VENV)/bin/ansible-test sanity --venv --python 3.11 --color no

unit: setup
	$(PYTEST) tests/unit

# The lab's own tests and the modules and roles run with ansible-playbook,
# side by side, each suite with its own lab; the lab's output follows.
integration: setup
	@log=$$(mktemp); \
	$(PYTEST) --basetemp=/tmp/thinair-tests-lab tests/lab > $$log 2>&1 & lab=$$!; \
	$(PYTEST) --basetemp=/tmp/thinair-tests-integration tests/integration; rc=$$?; \
	wait $$lab; lab_rc=$$?; echo "--- tests/lab"; cat $$log; rm -f $$log; \
	[ $$rc -eq 0 ] && [ $$lab_rc -eq 0 ]

# Every scenario under extensions/molecule, each against its own lab.
molecule: setup
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(VENV)/bin/molecule test --all

demo: setup
	$(VENV)/bin/ansible-playbook demo/quick_import.yml

demo-transfer: setup
	$(VENV)/bin/ansible-playbook demo/transfer.yml

bench: setup
	$(PY) bench/run.py copy
	$(PY) bench/run.py transfer
	$(PY) bench/run.py transfer --host-address 127.0.0.1
	$(PY) bench/run.py vm
	$(PY) bench/run.py import
	$(PY) bench/run.py load

clean:
	rm -rf $(VENV) .collections .cache
