"""PBFT (Castro and Liskov, OSDI'99 / TOCS'02): the sans-I/O replica and its phases
(execution, view change, state transfer), quorum certificates, the signed messages,
and the ledger client."""
