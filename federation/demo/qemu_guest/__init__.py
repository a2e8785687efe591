"""The self-checking guest: a busybox initramfs whose workload writes known data into its
memory and disk, verifies it continuously and prints a heartbeat counter (docs/qemu.md).

``make qemu-guest`` builds it (:mod:`federation.demo.qemu_guest.build`) into
``$DWCP_GUEST`` (default ``~/.cache/dwcp-guest``); ``build.load_assets`` finds it and
:mod:`federation.demo.qemu_guest.console` reads what it prints.
"""
