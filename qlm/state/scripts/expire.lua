-- Returns requests whose lease ran out to the head of their groups, and hands the virtual
-- queues of workers whose heartbeat stopped back to the pending pool. Idempotent: every worker
-- and the planner run it on their tick, so it happens while any of them is alive.
-- ARGV: prefix, max (requests to return per call)
-- Returns {requeued request ids, dead worker ids}
-- @include now
-- @include group_tokens
-- @include return_to_group
local p, max = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local requeued = {}
for _, rid in ipairs(redis.call('ZRANGEBYSCORE', p .. 'leases', '-inf', now, 'LIMIT', 0, max)) do
  if redis.call('HGET', p .. 'req:' .. rid, 'state') == 'running' then
    local gid = return_to_group(p, rid, now)
    redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'requeue',
      'rid', rid, 'gid', gid, 'why', 'lease')
    requeued[#requeued + 1] = rid
  else
    redis.call('ZREM', p .. 'leases', rid)
  end
end
local dead = redis.call('ZRANGEBYSCORE', p .. 'workers', '-inf', now)
for _, worker in ipairs(dead) do
  local vq = p .. 'vq:' .. worker
  for _, gid in ipairs(redis.call('LRANGE', vq, 0, -1)) do
    local g = redis.call('HMGET', p .. 'grp:' .. gid, 'model', 'deadline_ms')
    if g[1] then
      redis.call('HSET', p .. 'grp:' .. gid, 'vq', '')
      redis.call('ZADD', p .. 'pending:' .. g[1], g[2], gid)
      redis.call('PUBLISH', p .. 'wake:' .. g[1], gid)
    end
  end
  redis.call('DEL', vq, p .. 'worker:' .. worker)
  redis.call('ZREM', p .. 'workers', worker)
  redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'worker_lost',
    'worker', worker)
end
return {requeued, dead}
