"""Selling a document's cache per load (`kvcdn loadtest economics --price-per-load`): with the cost
model of kvcdn.loadtest.economics, what an agent saves against re-prefilling at the prefill price, what
the publisher earns and nets after its one prefill, and whether the network's fee pays for the egress
and storage of the edge placement."""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvcdn.loadtest.economics import Inputs, costs

__all__ = ["Market", "market"]


@dataclass(frozen=True)
class Market:
    """Who pays whom when a document's cache is sold per load (all loads of the inputs, in dollars)."""

    price: float
    """Per load."""
    agent_cost_per_load: float
    """The price and the compute the agent still runs over the cached context (prefill / reuse ratio)."""
    agent_saving_per_load: float
    """Against re-prefilling the document itself at the prefill price (negative: buying costs more)."""
    publisher_revenue: float
    publisher_net: float
    """Revenue less the one publishing prefill."""
    payback_loads: float
    """Loads after which the publishing prefill is paid back (inf: never)."""
    network_revenue: float
    network_cost: float
    """Egress (origin -> edge and edge -> agent) and storage of the edge placement."""
    max_price: float
    """Above this an agent saves nothing by buying."""
    network_floor_price: float
    """The price at which the network's fee covers its costs (inf: no fee)."""

    def sentences(self, i: Inputs) -> list[str]:
        share = i.network_fee_bps / 100
        out = [
            f"at ${self.price:g} a load an agent pays ${self.agent_cost_per_load:.5f} per load with its own reuse "
            f"compute, against ${i.prefill_usd:.5f} to prefill the document itself: it saves "
            f"${self.agent_saving_per_load:.5f} a load ({self.agent_saving_per_load / i.prefill_usd:.0%})."
        ]
        if self.agent_saving_per_load <= 0:
            out.append(f"no agent should buy at this price: above ${self.max_price:.5f} re-prefilling is cheaper.")
        out.append(
            f"the publisher earns ${self.publisher_revenue:,.2f} over {i.loads:,.0f} loads ({100 - share:g}% of each "
            f"price) and nets ${self.publisher_net:,.2f} after its prefill, paid back after "
            f"{self.payback_loads:,.1f} loads."
        )
        covered = "covers" if self.network_revenue >= self.network_cost else "does not cover"
        out.append(
            f"the network's {share:g}% (${self.network_revenue:,.2f}) {covered} its egress and storage "
            f"(${self.network_cost:,.2f}); its floor is ${self.network_floor_price:.5f} a load."
        )
        return out


def market(i: Inputs) -> Market:
    """The money of selling the cache at `i.price_per_load_usd` (see Market)."""
    edge = costs(i)["edge"]
    reuse_per_load = i.prefill_usd / i.reuse_ratio
    fee = i.network_fee_bps / 10_000
    publisher_per_load = i.price_per_load_usd * (1 - fee)
    network_cost = edge.origin_egress + edge.edge_egress + edge.storage
    return Market(
        price=i.price_per_load_usd,
        agent_cost_per_load=i.price_per_load_usd + reuse_per_load,
        agent_saving_per_load=i.prefill_usd - i.price_per_load_usd - reuse_per_load,
        publisher_revenue=i.loads * publisher_per_load,
        publisher_net=i.loads * publisher_per_load - i.prefill_usd,
        payback_loads=i.prefill_usd / publisher_per_load if publisher_per_load > 0 else math.inf,
        network_revenue=i.loads * i.price_per_load_usd * fee,
        network_cost=network_cost,
        max_price=i.prefill_usd - reuse_per_load,
        network_floor_price=network_cost / i.loads / fee if fee > 0 else math.inf,
    )
