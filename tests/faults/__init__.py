"""`make faults`: the fault campaign runner and its invariant checker."""
