"""The worker: owns one engine, pulls from its virtual queue when the engine has room, holds a
lease on what it runs, streams output to Redis and carries out the planner's actions."""
