-- A worker says it is alive: registers its address and models, and renews the leases of the
-- requests it still runs (only those it names, so a restarted worker does not keep alive the
-- requests its previous process held: they expire and go back to their groups).
-- ARGV: prefix, worker, ttl_ms, lease_ms, address, engine, models it can serve, max_running,
--       models loaded now, models held warm (the three lists space-separated), then running
--       request ids.
-- Returns {renewed, lost...}: lost ids are no longer this worker's (cancelled or expired).
-- @include now
local p, worker, ttl, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local now = now_ms()
redis.call('ZADD', p .. 'workers', now + ttl, worker)
redis.call('HSET', p .. 'worker:' .. worker, 'address', ARGV[5], 'engine', ARGV[6],
  'models', ARGV[7], 'max_running', ARGV[8], 'loaded', ARGV[9], 'warm', ARGV[10],
  'seen_ms', now)
local renewed, lost = 0, {}
for i = 11, #ARGV do
  local rid = ARGV[i]
  local f = redis.call('HMGET', p .. 'req:' .. rid, 'state', 'worker')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', p .. 'leases', now + lease_ms, rid)
    renewed = renewed + 1
  else
    lost[#lost + 1] = rid
  end
end
return {renewed, lost}
