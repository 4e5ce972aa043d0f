"""The arbiter: the one node per term that answers requests, hands out work and keeps files replicated."""
