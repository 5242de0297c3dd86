"""What belongs to an organization rather than to one of its objects: its API keys, its
limits, and the secrets it registered for its jobs."""
