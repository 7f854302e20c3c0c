-- Takes or keeps the planner leader lock. A new leader gets a new fencing epoch, so plans from
-- a deposed leader (same or older epoch, lock no longer held) are refused by install_plan.
-- ARGV: prefix, planner id, ttl_ms
-- Returns the epoch held, or 0 when another planner leads.
local p, me, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local holder = redis.call('GET', p .. 'leader')
if holder == me then
  redis.call('PEXPIRE', p .. 'leader', ttl)
  return tonumber(redis.call('GET', p .. 'epoch'))
end
if holder then return 0 end
redis.call('SET', p .. 'leader', me, 'PX', ttl)
return redis.call('INCR', p .. 'epoch')
