-- Cancels a request: a queued one leaves its group, a running one is ended here and its worker
-- is told to abort it (and loses it anyway at its next append). Finished requests stay as
-- they are.
-- ARGV: prefix, rid, retention_s
-- Returns {state before, state after}
-- @include now
-- @include group_tokens
-- @include notify
-- @include finalize
local p, rid = ARGV[1], ARGV[2]
local req = p .. 'req:' .. rid
local f = redis.call('HMGET', req, 'state', 'worker', 'group', 'cls')
local state = f[1]
if not state then return {'gone', 'gone'} end
if state == 'queued' then
  if redis.call('LREM', p .. 'grp:' .. f[3] .. ':q', 1, rid) == 1 then
    group_tokens(p, p .. 'grp:' .. f[3], rid, -1)
  end
  redis.call('HINCRBY', p .. 'depth', f[4], -1)
elseif state == 'running' then
  redis.call('ZREM', p .. 'leases', rid)
  redis.call('SREM', p .. 'running:' .. f[2], rid)
  redis.call('PUBLISH', p .. 'ctl:' .. f[2], 'abort ' .. rid)
else
  return {state, state}
end
finalize(p, rid, 'cancelled', 'cancelled', '', now_ms(), tonumber(ARGV[3]))
return {state, 'cancelled'}
