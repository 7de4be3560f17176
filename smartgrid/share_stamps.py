"""The DEBUG lines that time-stamp a share on the move, defined once for the services that log
them (the balancer's allocator, the substation) and bench.share_trace, which reads them back.

Each is the %-format the service logs with; ``smartgrid.log_lines.pattern`` derives the
regular expression that finds it in a log, so the two cannot drift apart.
"""

from __future__ import annotations

#: The allocator received a substation's ``power.demand`` report: substation, sent, received.
REPORT_RECEIVED = "report from %s at %.6f received at %.6f"
#: The allocator issued a grant: substation, share (kW), issued.
GRANT_ISSUED = "grant to %s of %.3f kW issued at %.6f"
#: A substation received its share: share (kW), issued, received.
SHARE_RECEIVED = "share of %.3f kW issued at %.6f received at %.6f"
