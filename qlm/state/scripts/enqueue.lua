-- Admits a request: stores it, puts it in the newest open group of its kind (or opens one) and
-- wakes the workers that serve its model.
-- ARGV: prefix, rid, kind, model, cls, max_queued, max_group_size, ttft_budget_ms, router
--       (watcher to notify, or ''), then field/value pairs of the request.
-- Returns {'ok', gid} | {'exists', state} | {'full', depth}
-- @include now
-- @include group_tokens
local p, rid, kind, model, cls = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local max_queued, max_group = tonumber(ARGV[6]), tonumber(ARGV[7])
local budget, router = tonumber(ARGV[8]), ARGV[9]
local req = p .. 'req:' .. rid

if redis.call('EXISTS', req) == 1 then
  return {'exists', redis.call('HGET', req, 'state')}
end
local depth = tonumber(redis.call('HGET', p .. 'depth', cls) or '0')
if depth >= max_queued then
  return {'full', tostring(depth)}
end

local now = now_ms()
local deadline = now + budget
local fields = {}
for i = 10, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', req, 'model', model, 'cls', cls, 'kind', kind, 'arrival_ms', now,
  'deadline_ms', deadline, 'state', 'queued', 'worker', '', 'out', 0, 'requeues', 0,
  unpack(fields))

local gid = redis.call('HGET', p .. 'open', kind)
local grp = gid and (p .. 'grp:' .. gid)
if not gid or redis.call('EXISTS', grp) == 0
    or tonumber(redis.call('HGET', grp, 'joined')) >= max_group then
  local seq = redis.call('INCR', p .. 'gseq')
  gid = 'g' .. seq
  grp = p .. 'grp:' .. gid
  redis.call('HSET', grp, 'model', model, 'cls', cls, 'kind', kind, 'deadline_ms', deadline,
    'created_ms', now, 'joined', 0, 'vq', '')
  redis.call('ZADD', p .. 'groups', seq, gid)
  redis.call('ZADD', p .. 'pending:' .. model, deadline, gid)
  redis.call('HSET', p .. 'open', kind, gid)
elseif deadline < tonumber(redis.call('HGET', grp, 'deadline_ms')) then
  -- an explicit tighter deadline pulls the whole group forward
  redis.call('HSET', grp, 'deadline_ms', deadline)
  if redis.call('HGET', grp, 'vq') == '' then
    redis.call('ZADD', p .. 'pending:' .. model, deadline, gid)
  end
end
redis.call('RPUSH', grp .. ':q', rid)
redis.call('HINCRBY', grp, 'joined', 1)
group_tokens(p, grp, rid, 1)
redis.call('HSET', req, 'group', gid)
redis.call('HINCRBY', p .. 'depth', cls, 1)
if router ~= '' then
  redis.call('SADD', p .. 'watch:' .. rid, router)
end
redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'arrive', 'rid', rid,
  'gid', gid, 'model', model, 'cls', cls)
redis.call('PUBLISH', p .. 'wake:' .. model, gid)
return {'ok', gid}
