"""The garbage collector's policy for a long-running relay process.

What start-up builds (imported modules, settings, clients: ~96,000 objects) lives as long as the
process. Left in the collector's oldest generation, each full collection scanned all of it again
while the poller's activities and the sink's outbox events passed through: one or two full
collections per 16,000 events, 40-100 ms of CPU (``bench/throughput.py``, measured with
``gc.callbacks``). Per event, the pipeline allocates several short-lived containers that no
cycle holds (freed by reference counting), yet with the default threshold (700) every 700 of
them cost a young collection, ~100 per 16,000 events.
"""

from __future__ import annotations

import gc

# Allocations of container objects between young collections (CPython's default: 700). The
# pipeline's per-event objects die by reference counting; a collection every 7,000 costs ~1 ms
# and holds at most that many cyclic-garbage objects a little longer.
GEN0_THRESHOLD = 7000


def settle_after_startup() -> None:
    """Collect start-up's garbage, exempt what survives from later collections, and collect
    young objects less often.

    Called once the process is set up, before work starts (``run_relay``). Process-wide: an
    object alive now is never examined again by the cyclic collector (reference counting still
    frees it), so a cycle that becomes garbage later is not reclaimed; start-up's objects live
    as long as the process.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
