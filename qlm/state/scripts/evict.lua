-- A worker pre-empts a request it runs: the request goes back to the head of its group at
-- once (not after its lease runs out), keeping the output stored so far, so whoever runs it
-- next continues from there.
-- ARGV: prefix, rid, worker
-- Returns {'ok', gid} | {'lost', state}
-- @include now
-- @include group_tokens
-- @include return_to_group
local p, rid, worker = ARGV[1], ARGV[2], ARGV[3]
local f = redis.call('HMGET', p .. 'req:' .. rid, 'state', 'worker')
if f[1] ~= 'running' or f[2] ~= worker then
  return {'lost', f[1] or 'gone'}
end
local gid = return_to_group(p, rid, now_ms())
redis.call('XADD', p .. 'events', 'MAXLEN', '~', 100000, '*', 'type', 'requeue', 'rid', rid,
  'gid', gid, 'why', 'evict', 'worker', worker)
return {'ok', gid}
