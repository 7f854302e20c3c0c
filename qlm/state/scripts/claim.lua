-- A worker with room pulls up to `n` requests: from the head of its virtual queue, else from
-- the pending groups of the models it serves (earliest deadline first), so serving goes on
-- when no planner is alive. Each claimed request gets a lease.
-- When the next work needs a model the worker can serve only after a swap (its queue's head
-- is of that model, or, with nothing for the models it serves, the most urgent pending group
-- is), it claims nothing more and names that model: the worker swaps once its batch drains
-- (the simulator's instances follow the same order, qlm/sim/simulator.py).
-- ARGV: prefix, worker, n, lease_ms, models served now, models it could swap to (both
--       space-separated).
-- Returns a flat list: the model to swap to ('' none), then for each request its id followed
-- by its HGETALL as one array.
-- @include now
-- @include group_tokens
local p, worker, n, lease_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local function set_of(words)
  local s = {}
  for w in string.gmatch(words, '%S+') do s[w] = true end
  return s
end
local served, swappable = set_of(ARGV[5]), set_of(ARGV[6])
local vq = p .. 'vq:' .. worker
local now = now_ms()
local claimed = {}

local function drop_group(gid, where)
  if where == vq then redis.call('LPOP', vq) else redis.call('ZREM', where, gid) end
  local grp = p .. 'grp:' .. gid
  local kind = redis.call('HGET', grp, 'kind')
  if kind and redis.call('HGET', p .. 'open', kind) == gid then
    redis.call('HDEL', p .. 'open', kind)
  end
  redis.call('DEL', grp)
  redis.call('ZREM', p .. 'groups', gid)
end

-- the most urgent pending group of `models`: its id, its zset's key and its model
local function most_urgent(models)
  local best, best_key, best_model, best_deadline = nil, nil, nil, nil
  for model in pairs(models) do
    local key = p .. 'pending:' .. model
    local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if head[1] and (not best_deadline or tonumber(head[2]) < best_deadline) then
      best, best_key, best_model, best_deadline = head[1], key, model, tonumber(head[2])
    end
  end
  return best, best_key, best_model
end

-- the next group to serve and where it sits ('vq' or the pending zset's key); or nil and the
-- model to swap to when the next work needs one
local function next_group()
  while true do
    local gid = redis.call('LINDEX', vq, 0)
    if not gid then break end
    local model = redis.call('HGET', p .. 'grp:' .. gid, 'model')
    if model and served[model] then return gid, vq end
    if model and swappable[model] then
      if redis.call('LLEN', p .. 'grp:' .. gid .. ':q') > 0 then return nil, nil, model end
      drop_group(gid, vq)
    else
      -- gone, or a model this worker cannot serve: hand it back to the pool
      redis.call('LPOP', vq)
      if model then
        redis.call('HSET', p .. 'grp:' .. gid, 'vq', '')
        redis.call('ZADD', p .. 'pending:' .. model,
          redis.call('HGET', p .. 'grp:' .. gid, 'deadline_ms'), gid)
      end
    end
  end
  local best, best_key = most_urgent(served)
  if best then return best, best_key end
  local _, _, model = most_urgent(swappable)
  return nil, nil, model
end

local swap_to = ''
while #claimed < 2 * n do
  local gid, where, wanted = next_group()
  if not gid then
    swap_to = wanted or ''
    break
  end
  local rid = redis.call('LPOP', p .. 'grp:' .. gid .. ':q')
  if not rid then
    drop_group(gid, where)
  elseif redis.call('HGET', p .. 'req:' .. rid, 'state') ~= 'queued' then
    -- defensive: only queued requests are in a group's list
    redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'skip', 'rid', rid)
  else
    local req = p .. 'req:' .. rid
    group_tokens(p, p .. 'grp:' .. gid, rid, -1)
    redis.call('HSET', req, 'state', 'running', 'worker', worker)
    if not redis.call('HGET', req, 'start_ms') then
      redis.call('HSET', req, 'start_ms', now)
    end
    redis.call('ZADD', p .. 'leases', now + lease_ms, rid)
    redis.call('SADD', p .. 'running:' .. worker, rid)
    local cls = redis.call('HGET', req, 'cls')
    redis.call('HINCRBY', p .. 'depth', cls, -1)
    redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'start', 'rid', rid,
      'gid', gid, 'worker', worker)
    claimed[#claimed + 1] = rid
    claimed[#claimed + 1] = redis.call('HGETALL', req)
    if redis.call('LLEN', p .. 'grp:' .. gid .. ':q') == 0 then
      drop_group(gid, where)
    end
  end
end
table.insert(claimed, 1, swap_to)
return claimed
