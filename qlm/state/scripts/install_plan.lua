-- Installs the leader's plan: each named worker's virtual queue becomes the listed groups, in
-- order. Groups that no longer exist are skipped; groups a replaced queue held that the plan
-- leaves out go back to the pending pool, so no group is ever lost by a plan.
-- ARGV: prefix, planner id, epoch, sequence, policy, compute_ms,
--       then per worker: worker id, n, n group ids
-- Returns {'ok'} | {'fenced', epoch in force}
-- @include now
local p, me, epoch = ARGV[1], ARGV[2], ARGV[3]
if redis.call('GET', p .. 'leader') ~= me or redis.call('GET', p .. 'epoch') ~= epoch then
  return {'fenced', redis.call('GET', p .. 'epoch') or '0'}
end
local placed, dropped = {}, {}
local i = 7
while i <= #ARGV do
  local worker, n = ARGV[i], tonumber(ARGV[i + 1])
  local vq = p .. 'vq:' .. worker
  local before = redis.call('LRANGE', vq, 0, -1)
  for _, gid in ipairs(before) do dropped[gid] = true end
  redis.call('DEL', vq)
  for j = i + 2, i + 1 + n do
    local gid = ARGV[j]
    local grp = p .. 'grp:' .. gid
    local model = redis.call('HGET', grp, 'model')
    if model and not placed[gid] then
      local held_by = redis.call('HGET', grp, 'vq')
      if held_by ~= '' and held_by ~= worker then
        redis.call('LREM', p .. 'vq:' .. held_by, 0, gid)
      end
      redis.call('RPUSH', vq, gid)
      redis.call('HSET', grp, 'vq', worker)
      redis.call('ZREM', p .. 'pending:' .. model, gid)
      placed[gid] = true
    end
  end
  -- wake the worker only when its queue changed
  local after = redis.call('LRANGE', vq, 0, -1)
  if table.concat(before, ' ') ~= table.concat(after, ' ') then
    redis.call('PUBLISH', p .. 'ctl:' .. worker, 'plan')
  end
  i = i + 2 + n
end
for gid in pairs(dropped) do
  if not placed[gid] then
    local g = redis.call('HMGET', p .. 'grp:' .. gid, 'model', 'deadline_ms')
    if g[1] then
      redis.call('HSET', p .. 'grp:' .. gid, 'vq', '')
      redis.call('ZADD', p .. 'pending:' .. g[1], g[2], gid)
    end
  end
end
redis.call('HSET', p .. 'plan', 'epoch', epoch, 'sequence', ARGV[4], 'policy', ARGV[5],
  'compute_ms', ARGV[6], 'created_ms', now_ms())
return {'ok'}
