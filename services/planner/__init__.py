"""Topology planning: measured profiles, a simulator of the router and workers, and the planner over them."""
