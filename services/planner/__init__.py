"""The planner: one leader (Redis lock with a fencing epoch) turns snapshots of the fleet into
plans, writes the virtual queues to Redis and pushes action plans to workers."""
