-- Puts a request back at the head of its group, recreating the group (same id) when it was
-- emptied and dropped meanwhile; the group goes back to the pending pool unless a virtual queue
-- still holds it. Used when a lease expires and when a request is evicted.
local function return_to_group(p, rid, now)
  local req = p .. 'req:' .. rid
  local f = redis.call('HMGET', req, 'group', 'model', 'cls', 'deadline_ms', 'kind', 'worker')
  local gid, model, cls, deadline, kind, worker = f[1], f[2], f[3], f[4], f[5], f[6]
  local grp = p .. 'grp:' .. gid
  if redis.call('EXISTS', grp) == 0 then
    redis.call('HSET', grp, 'model', model, 'cls', cls, 'kind', kind, 'deadline_ms', deadline,
      'created_ms', now, 'joined', 0, 'vq', '')
    redis.call('ZADD', p .. 'groups', tonumber(string.sub(gid, 2)) or 0, gid)
  end
  redis.call('LPUSH', grp .. ':q', rid)
  redis.call('HINCRBY', grp, 'joined', 1)
  group_tokens(p, grp, rid, 1)
  -- the group's deadline is its earliest member's
  if tonumber(deadline) < tonumber(redis.call('HGET', grp, 'deadline_ms')) then
    redis.call('HSET', grp, 'deadline_ms', deadline)
  end
  if redis.call('HGET', grp, 'vq') == '' then
    redis.call('ZADD', p .. 'pending:' .. model, redis.call('HGET', grp, 'deadline_ms'), gid)
  end
  if worker and worker ~= '' then
    redis.call('SREM', p .. 'running:' .. worker, rid)
  end
  redis.call('ZREM', p .. 'leases', rid)
  redis.call('HSET', req, 'state', 'queued', 'worker', '')
  redis.call('HINCRBY', req, 'requeues', 1)
  redis.call('HINCRBY', p .. 'depth', cls, 1)
  redis.call('PUBLISH', p .. 'wake:' .. model, gid)
  return gid
end
