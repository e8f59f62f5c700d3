# kata-trace-forwarder, the way Kata's components are built and installed:
#
#   make                  release binary, man page, shell completions
#   sudo make install     install them (honours DESTDIR and PREFIX)
#   make check            everything CI runs (scripts/test.sh)
#   make deb rpm image    packages and an OCI image (scripts/package.sh)
#
# `cargo install --path .` installs the binary alone.

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
DESTDIR ?=

CARGO ?= cargo
CARGO_FLAGS ?= --locked
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

BIN := kata-trace-forwarder
RELEASE_BIN := $(TARGET_DIR)/release/$(BIN)
GEN := $(TARGET_DIR)/dist

.PHONY: all build docs install uninstall check verify-units clean-dist deb rpm image packages test-packages

all: build docs

build:
	$(CARGO) build --release $(CARGO_FLAGS) --bin $(BIN)

# Generated from the CLI definition (crates/xtask), not by a build.rs, so
# that ordinary builds do not pay for it.
docs: build
	$(CARGO) run --release $(CARGO_FLAGS) -p xtask -- docs $(GEN)

# Built once if missing, so that `sudo make install` after `make` does not
# need a toolchain for root.
$(RELEASE_BIN):
	$(MAKE) build
$(GEN)/man/$(BIN).1:
	$(MAKE) docs

# The units name the installed binary: rendered here, for this BINDIR.
UNITS := $(BIN).service $(BIN)-hybrid.service $(BIN)-host.service

install: $(RELEASE_BIN) $(GEN)/man/$(BIN).1
	install -D -m 0755 $(RELEASE_BIN) $(DESTDIR)$(BINDIR)/$(BIN)
	install -D -m 0644 $(GEN)/man/$(BIN).1 $(DESTDIR)$(MANDIR)/man1/$(BIN).1
	install -D -m 0644 $(GEN)/completions/$(BIN).bash $(DESTDIR)$(DATADIR)/bash-completion/completions/$(BIN)
	install -D -m 0644 $(GEN)/completions/_$(BIN) $(DESTDIR)$(DATADIR)/zsh/site-functions/_$(BIN)
	install -D -m 0644 $(GEN)/completions/$(BIN).fish $(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$(BIN).fish
	install -d $(DESTDIR)$(UNITDIR)
	for u in $(UNITS); do \
		sed 's|@BINDIR@|$(BINDIR)|g' dist/$$u.in > $(DESTDIR)$(UNITDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	@# The settings file is the operator's: never overwritten.
	@if [ ! -e $(DESTDIR)$(SYSCONFDIR)/default/$(BIN) ]; then \
		echo install -D -m 0644 dist/$(BIN).default $(DESTDIR)$(SYSCONFDIR)/default/$(BIN); \
		install -D -m 0644 dist/$(BIN).default $(DESTDIR)$(SYSCONFDIR)/default/$(BIN); \
	fi

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/$(BIN) \
		$(DESTDIR)$(MANDIR)/man1/$(BIN).1 \
		$(DESTDIR)$(DATADIR)/bash-completion/completions/$(BIN) \
		$(DESTDIR)$(DATADIR)/zsh/site-functions/_$(BIN) \
		$(DESTDIR)$(DATADIR)/fish/vendor_completions.d/$(BIN).fish \
		$(DESTDIR)$(UNITDIR)/$(BIN).service \
		$(DESTDIR)$(UNITDIR)/$(BIN)-hybrid.service \
		$(DESTDIR)$(UNITDIR)/$(BIN)-host.service

check:
	scripts/test.sh

verify-units:
	scripts/verify-units.sh

# Into $(TARGET_DIR)/packages/, from the release build (made if stale).
deb rpm image:
	scripts/package.sh $@
packages:
	scripts/package.sh

# Installs and runs them for real (root; part of `make check`).
test-packages:
	scripts/test-packages.sh

clean-dist:
	rm -rf $(GEN)
