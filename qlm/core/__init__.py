"""The pure core: request groups, fleet snapshots, plans and scheduling policies. No gRPC and no
Redis in here, so the planner service and the simulator run the same code."""
