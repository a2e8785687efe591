"""Operator intents the node acts on alone, without the ledger: powering one of its own
qemu VMs on or off (``dwcp vm start|stop --node``). Signed like the ledger's intents
(consensus.ledger_commands) and checked at the API's door (federation.api.door) for the
operator role; the node checks that the intent names this DC and the VM of the path."""

from __future__ import annotations

from mesh import wire
from mesh.wire import Bool, Text, field

__all__ = ["PowerVm"]


@wire.message("operator.power-vm")
class PowerVm:
    """Boot (``on``) or power off the qemu VM ``vm`` at DC ``dc``, which the ledger says
    owns it. A migration's fence is not this: a VM fenced by a migration refuses both."""

    vm: str = field(Text(128))
    dc: str = field(Text(64))
    on: bool = field(Bool())
