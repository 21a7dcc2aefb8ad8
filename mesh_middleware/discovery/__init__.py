"""Where a destination's instances are: registry watches and static endpoints, cached."""
