# Two commands on a fresh machine: `make demo` and `make test` (both set everything up).
# The interpreter the virtualenv is made from (3.11 or newer): `make PYTHON=python3.12 test`.
PYTHON ?= python3
VENV := .venv
BUSYBOX := testdata/images/busybox
MULTI := testdata/images/busybox-multi
DOCKBUILD := $(VENV)/bin/dockbuild
PY311 := import sys; sys.exit(sys.version_info < (3, 11))

.PHONY: demo test setup deps lint bench clean image

setup: deps $(VENV)/.installed $(BUSYBOX)/index.json $(MULTI)/index.json
	@# bytecode, as `pip install .` makes it (PYTHONDONTWRITEBYTECODE may be set)
	@$(VENV)/bin/python -m compileall -q dockbuild >/dev/null

deps:
	bash .ci/install-deps
	bash .ci/start-dockerd
	bash .ci/start-binfmt

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -c '$(PY311)' 2>/dev/null || { \
	  echo "dockbuild needs Python 3.11 or newer; $(PYTHON) is: $$($(PYTHON) -V 2>&1)" >&2; \
	  echo "run make with PYTHON=<a python3.11 or newer>" >&2; exit 1; }
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/python -c '$(PY311)' || { \
	  echo "$(VENV) has $$($(VENV)/bin/python -V 2>&1); dockbuild needs 3.11 or newer:" >&2; \
	  echo "remove $(VENV) and run make with PYTHON=<a python3.11 or newer>" >&2; exit 1; }
	@# compat mode: a plain .pth path; the import-hook finder costs 24 ms per start
	$(VENV)/bin/pip install -q -e '.[test]' --config-settings editable_mode=compat
	touch $@

$(BUSYBOX)/index.json: testdata/make_busybox_image.py
	$(VENV)/bin/python testdata/make_busybox_image.py $(BUSYBOX)

# busybox for linux/amd64, arm64, arm/v7 and riscv64 in one index (Debian's packages)
$(MULTI)/index.json: testdata/make_multiplatform_image.py testdata/make_busybox_image.py
	$(VENV)/bin/python testdata/make_multiplatform_image.py $(MULTI)

demo: setup
	$(DOCKBUILD) --build-context busybox=oci-layout://$(BUSYBOX) -t hello:1 examples/hello | docker load
	docker run --rm hello:1

lint: setup
	$(VENV)/bin/ruff check dockbuild tests bench testdata
	$(VENV)/bin/mypy

test: lint
	DOCKBUILD_REQUIRE_DOCKER=1 $(VENV)/bin/pytest -q -p no:cacheprovider; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# dockbuild's own image (image/Dockerfile), built by dockbuild from wheels made here (its
# RUN steps need no network) on the local Debian base, reproducibly (the last commit's
# time): OCI tars in build/, loaded into docker as dockbuild:dev and dockbuild:dev-rootless.
DEBIAN := testdata/images/debian
IMAGE_WHEELS := build/image-wheels
IMAGE_EPOCH = $$(git log -1 --format=%ct 2>/dev/null || echo 0)

$(DEBIAN)/index.json: testdata/make_debian_base.py
	$(VENV)/bin/python testdata/make_debian_base.py $(DEBIAN)

image: setup $(DEBIAN)/index.json
	@# a stale build/lib would end up in the wheel
	rm -rf build/lib $(IMAGE_WHEELS)
	$(VENV)/bin/pip wheel -q --disable-pip-version-check -w $(IMAGE_WHEELS) . pip
	for variant in image:dev rootless:dev-rootless; do \
	  target=$${variant%%:*}; tag=$${variant#*:}; epoch=$(IMAGE_EPOCH); \
	  SOURCE_DATE_EPOCH=$$epoch $(DOCKBUILD) build --progress=plain --target $$target \
	    --build-arg SOURCE_DATE_EPOCH=$$epoch --build-arg BASE=base \
	    --build-context base=oci-layout://$(DEBIAN) --build-context wheels=$(IMAGE_WHEELS) \
	    -t dockbuild:$$tag -o type=oci,rewrite-timestamp=true,dest=build/dockbuild-$$tag.tar \
	    -o type=docker,rewrite-timestamp=true,dest=build/dockbuild-$$tag.docker.tar image \
	  && docker load -i build/dockbuild-$$tag.docker.tar && rm build/dockbuild-$$tag.docker.tar \
	  || exit 1; \
	done

bench: setup
	$(VENV)/bin/python bench/startup_and_rebuild.py

# build/ too: setuptools packages whatever build/lib holds, stale modules included.
clean:
	rm -rf $(VENV) testdata/images build dockbuild.egg-info
